"""`visiondet demo`: the Gradio page (page), what runs the models (handlers, models), what draws (views)."""
