/* RoPE sin/cos cache cost by position: a copy of llama.cpp's ggml_rope_cache_init loop (ggml-cpu/ops.cpp), timed.
   glibc's sincosf reduces |theta| >= 120 on a slower path, so the cache gets dearer with depth; this measures by how much.
   gcc -O3 bench/rope_sincos.c -o /tmp/rope_sincos -lm && /tmp/rope_sincos        (bench/NOTES.md §11) */
#define _GNU_SOURCE
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e9+t.tv_nsec;}
/* ggml_rope_cache_init for one position: ne0/2 pairs, theta = p * base^(-2i/n_dims) */
__attribute__((noinline)) static void cache_init(float p, float theta_scale, int ne0, float *cache){
  float theta=p;
  for(int i0=0;i0<ne0;i0+=2){ float s,c; sincosf(theta,&s,&c); cache[i0]=c; cache[i0+1]=s; theta*=theta_scale; }
}
int main(int argc,char**argv){
  int ne0=256; float cache[256]; int reps=20000;
  float bases[2]={10000.f,1000000.f};
  int pos[]={13,172,658,1024,2048,4096,8192,32768};
  for(int b=0;b<2;b++){
    float ts=powf(bases[b],-2.0f/ne0);
    for(unsigned k=0;k<sizeof pos/sizeof*pos;k++){
      double best=1e30;
      for(int t=0;t<7;t++){double t0=now(); for(int r=0;r<reps;r++){cache_init((float)pos[k],ts,ne0,cache); __asm__ volatile(""::"r"(cache):"memory");} double dt=(now()-t0)/reps; if(dt<best)best=dt;}
      int slow=0; float th=pos[k]; for(int i=0;i<ne0/2;i++){ if(fabsf(th)>=120.f) slow++; th*=ts; }
      printf("base %.0e pos %5d: %.0f ns per cache init (%d of %d pairs with theta >= 120)\n",bases[b],pos[k],best,slow,ne0/2);
    }
  }
  return 0;
}
