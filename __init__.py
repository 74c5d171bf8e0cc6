"""USV: Unified Sparsification for Video diffusion, a ComfyUI node pack.

ComfyUI imports this file as the pack's entry; the algorithms live in usv_core/, which never
imports comfy, and the node adapters in nodes/.
"""

WEB_DIRECTORY = "web"


async def comfy_entrypoint():
    from .nodes import USVExtension

    return USVExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
