/* The encoders compiled for AVX2 (8 float lanes per instruction); chosen at run time where the CPU has it. */
#if defined(__x86_64__) && defined(__GNUC__)
#include <math.h>
#include <stdint.h>
#include <string.h>
#pragma GCC target("avx2")
#define KERNEL(name) name##_avx2
#include "kernels.h"
#endif
