"""Processes: one proxy's assembly and lifecycle, the supervisor and its workers, the listener."""
