"""What a run records about itself and how runs are found: run folders (`paths`), env.json (`env`), status.json
(`status`), reading a run's files back (`records`), the runs table (`table`), `imgclf runs compare` (`compare`) and
the tracking sinks (`sinks`). `tracking.runs` re-exports the names of the first five."""

__all__: list[str] = []
