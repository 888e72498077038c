"""RadVLM inference core: DICOM pixels → model input, prompts, parsers, model runner, task plan."""
