/* The encoders for any CPU the compiler targets by default (SSE2 on x86-64). */
#define KERNEL(name) name##_baseline
#include "kernels.h"
