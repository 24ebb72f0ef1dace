// What state are this machine's two vCPUs in? Sampled every ~3 s: the round trip between threads
// pinned to vCPU 0 and vCPU 1 (best of 5 x 20,000), and the read rate of 512 MiB with one thread and
// with two (AVX-512 loads, best of 3). bench/NOTES.md section 12 reads it against the sweeps' split cost.
//
//   gcc -O2 -mavx512f -pthread bench/vcpu_probe.c -o /tmp/vcpu_probe && /tmp/vcpu_probe [SECONDS=600]
//
// Needs AVX-512F and two CPUs; prints one line per sample: t_s lat_ns bw1_GBs bw2_GBs.
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <immintrin.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
static void pin(int c){cpu_set_t s;CPU_ZERO(&s);CPU_SET(c,&s);pthread_setaffinity_np(pthread_self(),sizeof s,&s);}
static _Alignas(64) atomic_int ball; static int NPP=20000;
static void* pong(void*a){pin(1);for(int i=0;i<NPP;i++){while(atomic_load_explicit(&ball,memory_order_acquire)!=2*i+1);atomic_store_explicit(&ball,2*i+2,memory_order_release);}return 0;}
static double pingpong(void){atomic_store(&ball,0);pthread_t t;pthread_create(&t,0,pong,0);pin(0);double t0=now();
 for(int i=0;i<NPP;i++){atomic_store_explicit(&ball,2*i+1,memory_order_release);while(atomic_load_explicit(&ball,memory_order_acquire)!=2*i+2);}
 double dt=now()-t0;pthread_join(t,0);return dt/NPP*1e9;}
static char*buf; static size_t N=(size_t)1<<29; // 512 MiB
typedef struct{int cpu;size_t lo,hi;double sec;long long r;}job;
static void* rd(void*a){job*j=a;pin(j->cpu);__m512i x0=_mm512_setzero_si512(),x1=x0,x2=x0,x3=x0;double t0=now();
 for(size_t o=j->lo;o<j->hi;o+=256){x0=_mm512_xor_si512(x0,_mm512_load_si512(buf+o));x1=_mm512_xor_si512(x1,_mm512_load_si512(buf+o+64));
  x2=_mm512_xor_si512(x2,_mm512_load_si512(buf+o+128));x3=_mm512_xor_si512(x3,_mm512_load_si512(buf+o+192));}
 j->sec=now()-t0;x0=_mm512_xor_si512(_mm512_xor_si512(x0,x1),_mm512_xor_si512(x2,x3));j->r=_mm512_reduce_add_epi64(x0);return 0;}
static double bw(int nt){pthread_t t[2];job j[2];for(int i=0;i<nt;i++){j[i]=(job){i,N/nt*i,N/nt*(i+1),0,0};pthread_create(&t[i],0,rd,&j[i]);}
 double mx=0;for(int i=0;i<nt;i++){pthread_join(t[i],0);if(j[i].sec>mx)mx=j[i].sec;}return N/mx/1e9;}
int main(int c,char**v){int secs=c>1?atoi(v[1]):600;buf=aligned_alloc(64,N);
 if(!buf||secs<=0){fprintf(stderr,"vcpu_probe: usage: vcpu_probe [SECONDS>0] (needs 512 MiB)\n");return 2;}
memset(buf,1,N);double end=now()+secs,t00=now();
 printf("t_s lat_ns bw1_GBs bw2_GBs\n");
 while(now()<end){double l[5];for(int i=0;i<5;i++)l[i]=pingpong();double lm=l[0];for(int i=1;i<5;i++)if(l[i]<lm)lm=l[i];
  double b1=0,b2=0;for(int i=0;i<3;i++){double x=bw(1);if(x>b1)b1=x;x=bw(2);if(x>b2)b2=x;}
  printf("%.0f %.1f %.2f %.2f\n",now()-t00,lm,b1,b2);fflush(stdout);struct timespec s={2,0};nanosleep(&s,0);}
}
