"""What each task does at inference: its input transform, model output -> typed result, drawing, records.

``Task.inference`` names the class (:class:`~apps.tasks.inference.base.Inference`); predict, evaluate's
caller, the demo and export dispatch through it once, never on the task's name.
"""
