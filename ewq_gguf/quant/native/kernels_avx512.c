/* The encoders compiled for AVX-512 (16 float lanes per instruction); chosen at run time where the CPU has it. */
#if defined(__x86_64__) && defined(__GNUC__)
#include <math.h>
#include <stdint.h>
#include <string.h>
#pragma GCC target("avx512f")
#define KERNEL(name) name##_avx512
#include "kernels.h"
#endif
