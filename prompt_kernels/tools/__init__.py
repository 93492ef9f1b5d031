"""Developer tools over the kernel registry: compile check (sm_80/sm_90 without a GPU), traffic meter
(Triton interpreter) and roofline report."""
