# GPU-only build (-DADAKV_GPU_ONLY=ON): the CUDA kernel library, its GPU tests and the kernel
# benchmarks, nothing that needs adakv_lib's third-party packages (PCRE2, OpenBLAS, httplib),
# which the GPU machine lacks. Used by scripts/gpu_decode_check.sh. Included from the top level.
include(${CMAKE_SOURCE_DIR}/src/backends/cuda/cuda_toolchain.cmake)
find_package(Threads REQUIRED)
add_subdirectory(${CMAKE_SOURCE_DIR}/src/backends/cuda ${CMAKE_BINARY_DIR}/cuda_kernels)

# Kernel tests that need only adakv_cuda_kernels (tests/gpu/ may hold others that need more).
# Built with GoogleTest when the machine has its libraries, else with the tests' own main().
set(ADAKV_GPU_KERNEL_TESTS ${CMAKE_SOURCE_DIR}/tests/gpu/test_decode_attention.cc)
find_package(GTest QUIET)
add_executable(adakv_gpu_kernel_tests ${ADAKV_GPU_KERNEL_TESTS})
target_link_libraries(adakv_gpu_kernel_tests PRIVATE adakv_cuda_kernels Threads::Threads)
target_compile_definitions(adakv_gpu_kernel_tests PRIVATE ADAKV_HAVE_CUDA=1)
if(GTest_FOUND)
  target_link_libraries(adakv_gpu_kernel_tests PRIVATE GTest::gtest GTest::gtest_main)
  message(STATUS "adakv GPU-only build: tests use GoogleTest")
else()
  target_compile_definitions(adakv_gpu_kernel_tests PRIVATE ADAKV_PLAIN_TEST_MAIN=1)
  message(STATUS "adakv GPU-only build: GoogleTest not found, tests use their own main()")
endif()

add_subdirectory(${CMAKE_SOURCE_DIR}/bench ${CMAKE_BINARY_DIR}/bench)
