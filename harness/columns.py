"""Column names of a run's tables: the one place they are defined."""

# op/segment table (one row per timed segment or host gap)
CONTEXT = "context"  # context label: short / medium / long / an integer's string
DEPTH = "depth"  # n_past when the token was decoded (KV cells before it)
ROUND = "round"  # measurement round: every round decodes each depth once per pass, in a rotating order
NODE_FIRST = "node_first"  # first graph node index of the segment (-1 for host)
NODE = "node"  # last graph node index of the segment: the node the callback observed
NAME = "name"
LAYER = "layer"  # -1 when the name has no -N suffix
OP = "op"
STAGE = "stage"
TIME_US = "time_us"
OP_COLUMNS = (CONTEXT, DEPTH, ROUND, NODE_FIRST, NODE, NAME, LAYER, OP, STAGE, TIME_US)

# per-token wall times (both passes), stored in the run metadata and loaded as a table
PASS = "pass"  # PLAIN (no callback), PROFILED (eval callback) or CALIBRATION (callback + extra splits)
SPLITS = "splits"  # graph splits (asked boundaries) of the token: 0 for plain
WALL_US = "wall_us"
TOKEN_COLUMNS = (CONTEXT, DEPTH, ROUND, PASS, SPLITS, WALL_US)
PLAIN, PROFILED, CALIBRATION = "plain", "profiled", "calibration"

# the calibration token's segments summed per stage (a token that asked every node: an ops-mode token in the
# stages run's round), stored in the run metadata (RunRecord.calibration_stages)
SEGMENTS = "segments"  # timed segments (graph splits) summed into the row; 0 for host
CALIB_STAGE_COLUMNS = (CONTEXT, DEPTH, ROUND, STAGE, SEGMENTS, TIME_US)
