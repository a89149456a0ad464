// Programmatic dependent launch (sm_90) of the forward's small kernels: each such kernel is
// launched while the kernel before it on the stream still runs; its blocks become resident as
// that kernel's blocks leave, request the data nobody writes (weights) in L2, and wait
// (griddepcontrol.wait) for the preceding grid to finish before they read or write anything
// else. A decode step is ~11 kernels per layer, most of them a few µs long at small batches, so
// the launch gap and the first loads' latency of each are a large share of the step.
//
// Host side here; the device side (the wait, the release of the next kernel, the launch) is in
// dependent_launch.cuh.
#pragma once

namespace adakv::cuda {

// Whether the model ops launch as programmatic dependents: on for devices of compute capability
// 9.0 and up (decided on the first call, with the device current then), unless
// ADAKV_DEPENDENT_LAUNCH=0 in the environment. Results are identical either way.
bool dependent_launches();
// Overrides it for this process (tests and benchmarks compare the two; graphs captured before
// keep the launches of their capture). Ignored (stays off) on devices before sm_90.
void set_dependent_launches(bool on);

}  // namespace adakv::cuda
