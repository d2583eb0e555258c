// The SIMT emulator as seen by kernel code: included by platform.cuh when SEGATTN_EMULATE is
// defined (host C++ build of the .cu files). See kernels/emu/README.md.
#ifndef SEGATTN_EMU_EMU_CUH
#define SEGATTN_EMU_EMU_CUH

#include <cstdio>

#include "emu/cuda_types.h"
#include "emu/device_functions.h"
#include "emu/runtime.h"

#endif  // SEGATTN_EMU_EMU_CUH
