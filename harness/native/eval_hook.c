/* Native eval callback for llama.cpp's scheduler (``cb_eval``); loaded by harness/hook.py.
 *
 * The scheduler calls it twice per node it may stop at: with ask=true for every node, in order
 * ("do you want this node?"), and with ask=false after computing up to an asked node and
 * synchronising. Timing mode answers asks from a table and, on each observe, stores the node
 * index and a CLOCK_MONOTONIC reading in preallocated arrays: no Python runs per node.
 * Discovery mode hands every node to a Python function and asks for none.
 *
 * ``struct hook`` is mirrored by ``_HookState`` in harness/hook.py; harness_hook_size() lets the
 * loader check that the two agree.
 */
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

typedef void (*node_fn)(void *tensor);

struct hook {
    const uint8_t *ask;  /* ask[i] != 0: stop (compute, sync, observe) after node i */
    int64_t n_ask;       /* nodes beyond the table are asked */
    int64_t i;           /* asks seen this step */
    int64_t t_first;     /* clock at the first ask of the step, ns */
    int64_t *mark_node;  /* observed node indices ... */
    int64_t *mark_t;     /* ... and their clock readings, ns */
    int64_t n_marks;
    int64_t cap_marks;
    int32_t discovering;
    node_fn on_node;     /* called with each node while discovering */
};

int64_t harness_hook_size(void) { return (int64_t) sizeof(struct hook); }

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

bool harness_eval_hook(void *t, bool ask, void *ud) {
    struct hook *h = (struct hook *) ud;
    if (ask) {
        int64_t i = h->i++;
        if (i == 0) h->t_first = now_ns();
        if (h->discovering) {
            h->on_node(t);
            return false;
        }
        return i < h->n_ask ? h->ask[i] != 0 : true;
    }
    if (h->n_marks < h->cap_marks) {
        h->mark_node[h->n_marks] = h->i - 1;
        h->mark_t[h->n_marks] = now_ns();
        h->n_marks++;
    }
    return true;
}
