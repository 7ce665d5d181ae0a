"""Stage entry points: what `rlhf stage <name>` runs. Each reads params and fixed input paths
and writes fixed outputs (see rlhf_core.paths), so DVC can declare and cache it."""
