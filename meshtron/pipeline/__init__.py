"""Pipeline parallelism over the mesh's `pipe` axis: which layers each rank holds (`stages`), schedules as
per-rank action lists (`schedule`), and the runner that executes them (`runner`)."""
