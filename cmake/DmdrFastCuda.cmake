# Decide whether CUDA is compiled in, and how the CUDA part of _C is built.
include(CheckLanguage)

string(TOUPPER "${DMDR_FAST_CUDA}" _dmdr_cuda_mode)
set(DMDR_FAST_WITH_CUDA OFF)
if(_dmdr_cuda_mode STREQUAL "OFF")
  message(STATUS "dmdr_fast: CUDA disabled (DMDR_FAST_CUDA=OFF)")
else()
  if(NOT CMAKE_CUDA_COMPILER)
    # Make a compiler on PATH or in the default toolkit location discoverable.
    find_program(_dmdr_nvcc nvcc HINTS ENV CUDA_HOME ENV CUDA_PATH PATH_SUFFIXES bin
                 PATHS /usr/local/cuda/bin)
    if(_dmdr_nvcc)
      get_filename_component(_dmdr_nvcc_real "${_dmdr_nvcc}" REALPATH)
      set(CMAKE_CUDA_COMPILER "${_dmdr_nvcc_real}")
    endif()
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(CMAKE_CUDA_ARCHITECTURES "${DMDR_FAST_CUDA_ARCHS}")
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(DMDR_FAST_WITH_CUDA ON)
    message(STATUS "dmdr_fast: CUDA ${CMAKE_CUDA_COMPILER_VERSION}, archs ${DMDR_FAST_CUDA_ARCHS}")
  elseif(_dmdr_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR "dmdr_fast: DMDR_FAST_CUDA=ON but no CUDA compiler was found "
                        "(set CUDACXX or put nvcc on PATH)")
  else()
    message(STATUS "dmdr_fast: no CUDA compiler found, building CPU kernels only")
  endif()
endif()

if(DMDR_FAST_WITH_CUDA)
  set(DMDR_FAST_WITH_CUDA_INT 1)
  set(DMDR_FAST_CUDA_ARCHS_USED "${DMDR_FAST_CUDA_ARCHS}")
  set(DMDR_FAST_CUDA_COMPILER_STR "${CMAKE_CUDA_COMPILER_ID} ${CMAKE_CUDA_COMPILER_VERSION}")
else()
  set(DMDR_FAST_WITH_CUDA_INT 0)
  set(DMDR_FAST_CUDA_ARCHS_USED "")
  set(DMDR_FAST_CUDA_COMPILER_STR "")
endif()

# CUDA flags for a target: static runtime (imports without a driver, reports 0 devices), C++17,
# line info for profilers, and no fast-math (the NaN semantics of the ops depend on it).
function(dmdr_fast_configure_cuda_target target)
  set_target_properties(${target} PROPERTIES CUDA_RUNTIME_LIBRARY Static CUDA_STANDARD 17
                                             CUDA_STANDARD_REQUIRED ON)
  target_link_libraries(${target} PRIVATE CUDA::cudart_static)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 -lineinfo
                                           --expt-relaxed-constexpr>)
endfunction()
