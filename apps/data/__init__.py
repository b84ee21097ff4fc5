"""`visiondet data check|convert|preview`: the jobs (run), the anchor section of the check (anchors)."""
