"""ComfyUI nodes. Thin: parse inputs, call `pipelines/`, return."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
