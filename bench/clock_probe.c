// Does dense vector work lower this vCPU's clock for the code that follows? Each round: every thread runs
// LOAD_US of a load (0 fma: AVX-512 FMAs on 8 independent accumulators, the densest work; 1 scalar: a
// dependent integer chain, the lightest busy work), then times W windows of a fixed dependent integer chain
// (its cycles are fixed: its time is 1/clock). Loads alternate ABBA by round. Prints per window and
// thread the ratio fma / scalar of each window's 20 % trimmed mean over rounds (bench/NOTES.md section 29);
// RAW=1 in the environment prints the rounds instead: round thread load w0_ns ... w{W-1}_ns.
//   gcc -O2 -mavx512f -pthread bench/clock_probe.c -o /tmp/clock_probe && /tmp/clock_probe [ROUNDS=400] [THREADS=2] [LOAD_US=1000]
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#define W 12
#define CHAIN 20000
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
static int R=400,T=2; static double LOAD=1e-3; static pthread_barrier_t bar; static double (*res)[2][W];
static volatile long sink; static volatile float fsink;
static int cmp(const void*a,const void*b){double x=*(const double*)a,y=*(const double*)b;return (x>y)-(x<y);}
static double trimmed(double*v,int n){qsort(v,n,sizeof *v,cmp);int k=n/5;double s=0;for(int i=k;i<n-k;i++)s+=v[i];return s/(n-2*k);}
static long chain(long x,int n){for(int i=0;i<n;i++){__asm__ volatile("add $1, %0":"+r"(x));}return x;}
static void load_fma(double until){__m512 a0=_mm512_set1_ps(1.0001f),a1=a0,a2=a0,a3=a0,a4=a0,a5=a0,a6=a0,a7=a0,m=_mm512_set1_ps(0.99999f),c=_mm512_set1_ps(1e-6f);
 while(now()<until){for(int i=0;i<256;i++){a0=_mm512_fmadd_ps(a0,m,c);a1=_mm512_fmadd_ps(a1,m,c);a2=_mm512_fmadd_ps(a2,m,c);a3=_mm512_fmadd_ps(a3,m,c);
  a4=_mm512_fmadd_ps(a4,m,c);a5=_mm512_fmadd_ps(a5,m,c);a6=_mm512_fmadd_ps(a6,m,c);a7=_mm512_fmadd_ps(a7,m,c);}}
 fsink=_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0,a1),_mm512_add_ps(a2,a3)),_mm512_add_ps(_mm512_add_ps(a4,a5),_mm512_add_ps(a6,a7))));}
static void load_scalar(double until){long x=0;while(now()<until)x=chain(x,1000);sink=x;}
static int load_of(int r){return ((r&3)==0||(r&3)==3)?0:1;}  // ABBA: 0 fma, 1 scalar
static void* worker(void*arg){int id=(int)(long)arg;
 for(int r=0;r<R;r++){int L=load_of(r); pthread_barrier_wait(&bar);
  double t0=now(); if(L==0)load_fma(t0+LOAD); else load_scalar(t0+LOAD);
  long x=0; for(int w=0;w<W;w++){double a=now(); x=chain(x,CHAIN); res[r][id][w]=now()-a;} sink=x;}
 return 0;}
int main(int argc,char**argv){
 if(argc>1)R=atoi(argv[1]);
 if(argc>2)T=atoi(argv[2]);
 if(argc>3)LOAD=atof(argv[3])*1e-6;
 if(R<4||T<1||T>2){fprintf(stderr,"usage: clock_probe [ROUNDS>=4] [THREADS=1|2] [LOAD_US]\n");return 2;}
 res=calloc(R,sizeof *res); pthread_barrier_init(&bar,0,T); pthread_t th[2];
 for(int i=0;i<T;i++)pthread_create(&th[i],0,worker,(void*)(long)i);
 for(int i=0;i<T;i++)pthread_join(th[i],0);
 if(getenv("RAW")){
  for(int r=0;r<R;r++)for(int i=0;i<T;i++){
   printf("%d %d %d",r,i,load_of(r));
   for(int w=0;w<W;w++)printf(" %.1f",res[r][i][w]*1e9);
   printf("\n");}
  return 0;}
 double*v=malloc(R*sizeof *v);
 printf("%d rounds, %d threads, %.0f us of load; per window (%d adds): fma / scalar of trimmed means\n",R,T,LOAD*1e6,CHAIN);
 for(int i=0;i<T;i++){
  printf("thread %d:",i);
  for(int w=0;w<W;w++){
   double m[2];
   for(int L=0;L<2;L++){int n=0; for(int r=0;r<R;r++)if(load_of(r)==L)v[n++]=res[r][i][w]; m[L]=trimmed(v,n);}
   printf(" %.4f",m[0]/m[1]); if(w==0)printf(" (%.0f ns)",m[1]*1e9);}
  printf("\n");}
 return 0;}
