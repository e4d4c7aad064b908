#pragma once
#include <cstdint>
#ifdef FASTINF_OPENMP
#include <omp.h>
#endif
