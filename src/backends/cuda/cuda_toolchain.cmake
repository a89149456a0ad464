# CUDA toolchain settings shared by the full build and the GPU-only build; included from the
# top-level CMakeLists.txt (enable_language must run at the top level).
#
# Hopper with wgmma (sm_90a) plus Ampere (sm_80), set once here; a GPU machine may build only
# its own architecture (-DADAKV_CUDA_ARCHITECTURES=90a-real) to halve the compile time.
set(ADAKV_CUDA_ARCHITECTURES "80-real;90a-real" CACHE STRING "CUDA architectures to build for")
set(CMAKE_CUDA_ARCHITECTURES ${ADAKV_CUDA_ARCHITECTURES})
enable_language(CUDA)
# CMake before 3.26 does not know that nvcc 12+ speaks C++20, and CUDA targets inherit the
# project's CXX_STANDARD 20 (REQUIRED): it would refuse to generate. Teach it the flag.
if(NOT DEFINED CMAKE_CUDA20_STANDARD_COMPILE_OPTION AND CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.0)
  set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
  set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  list(APPEND CMAKE_CUDA_COMPILE_FEATURES cuda_std_20)
  set(CMAKE_CUDA20_COMPILE_FEATURES cuda_std_20)
endif()
set(CMAKE_CUDA_STANDARD 20)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
option(ADAKV_CUDA_PTXAS_VERBOSE "Print registers, spills and shared memory of every kernel" OFF)
if(ADAKV_CUDA_PTXAS_VERBOSE)
  add_compile_options($<$<COMPILE_LANGUAGE:CUDA>:-Xptxas=-v>)
endif()
find_package(CUDAToolkit REQUIRED)
