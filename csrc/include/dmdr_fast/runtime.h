// Device-runtime queries that must work (and report, not fail) on machines without a driver.
#pragma once

#include <string>
#include <utility>

namespace dmdr_fast {
// (number of visible CUDA devices, reason when it is 0). Never throws.
std::pair<int, std::string> cuda_device_count();
// "major.minor" compute capability of `device`, or "" when unavailable.
std::string cuda_device_capability(int device);
}  // namespace dmdr_fast
