"""The engine layer: one vLLM engine on one accelerator (`engine.py`), what each task asks of it and
how its output is parsed (`tasks.py`), the settings each device gets (`profiles.py`), and how busy its
scheduler was (`load.py`). Used by batch jobs and the Serve app alike; imports nothing from `batch`
or `serve`."""
