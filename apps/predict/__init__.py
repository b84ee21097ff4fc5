"""`visiondet predict`: sources -> decoding -> the task's input transform -> model -> results -> writers."""
