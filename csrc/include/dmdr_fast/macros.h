// Portability macros shared by host C++ and CUDA device code.
#pragma once

#if defined(__CUDACC__)
#define DMDR_HD __host__ __device__ __forceinline__
#else
#define DMDR_HD inline
#endif
