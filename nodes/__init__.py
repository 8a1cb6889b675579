"""ComfyUI nodes. Thin: parse inputs, call `pipelines/`, return.

Node ids are prefixed and never renamed; inputs are only ever appended (saved workflows store
widget values by position).
"""

from .clip_prompt_node import OneStepSRCLIPPromptExtract
from .comfy_adapter import register_if_hosted
from .degradation_node import OneStepSRDegradationEstimator
from .loader_node import OneStepSRLoader
from .timestep_node import OneStepSRTimestep
from .upscale_node import OneStepSRUpscale

NODE_CLASS_MAPPINGS = {
    "OneStepSR_Loader": OneStepSRLoader,
    "OneStepSR_Upscale": OneStepSRUpscale,
    "OneStepSR_DTSMTimestep": OneStepSRTimestep,
    "OneStepSR_DegradationEstimator": OneStepSRDegradationEstimator,
    "OneStepSR_CLIPPromptExtract": OneStepSRCLIPPromptExtract,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "OneStepSR_Loader": "Load OneStep SR",
    "OneStepSR_Upscale": "OneStep Upscale",
    "OneStepSR_DTSMTimestep": "DTSM Timestep",
    "OneStepSR_DegradationEstimator": "Degradation Estimator",
    "OneStepSR_CLIPPromptExtract": "CLIP Prompt Extract",
}

register_if_hosted()
