"""Run one ComfyUI workflow on several GPUs at once: one ComfyUI process per GPU, all executing
the same workflow in lockstep, its USV Sequence Parallel node splitting each video's tokens over
them. Rank 0 writes the outputs; the others write theirs to a temporary folder.

    torchrun --nproc-per-node 2 custom_nodes/comfyui-usv/scripts/sequence_parallel.py workflow.json

workflow.json: the workflow as ComfyUI saves it (UI format) or exports it (API format), with a
USV Sequence Parallel node on the Wan model. Run it from the ComfyUI folder (or pass --comfyui);
models are read from ComfyUI's models folder (or --base-directory). Every rank loads the whole
model onto its own GPU. See docs/multigpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workflow", help="workflow JSON (UI or API format) with a USV Sequence Parallel node")
    p.add_argument("--comfyui", default=None, help="the ComfyUI folder (default: COMFYUI_DIR, else the current folder)")
    p.add_argument("--base-directory", default=None, help="ComfyUI's base directory for models, input and output "
                                                          "(default: the ComfyUI folder)")
    p.add_argument("--output-directory", default=None, help="where rank 0 writes outputs (default: ComfyUI's)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU with gloo (tests; no speedup)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    comfyui = args.comfyui or os.environ.get("COMFYUI_DIR") or os.getcwd()
    if not os.path.isfile(os.path.join(comfyui, "comfyui_version.py")):
        raise SystemExit(f"{comfyui} is not a ComfyUI folder: run from it or pass --comfyui")
    os.environ["COMFYUI_DIR"] = os.path.abspath(comfyui)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))

    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: ComfyUI then runs on the CPU
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        # ComfyUI puts models on the current CUDA device: one GPU per rank
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    if PACK not in sys.path:
        sys.path.insert(0, PACK)
    from harness import runtime, ui_workflow

    nodes = runtime.boot(base_dir=args.base_directory or os.environ["COMFYUI_DIR"])
    import folder_paths

    if rank == 0 and args.output_directory:
        folder_paths.set_output_directory(os.path.abspath(args.output_directory))
    elif rank > 0:
        folder_paths.set_output_directory(tempfile.mkdtemp(prefix=f"usv-rank{rank}-"))

    with open(args.workflow) as f:
        workflow = json.load(f)
    prompt = ui_workflow.ui_to_api(nodes, workflow) if "nodes" in workflow and "links" in workflow else workflow
    if not any(isinstance(n, dict) and n.get("class_type") == "USVSequenceParallel" for n in prompt.values()):
        print(f"rank {rank}: the workflow has no USV Sequence Parallel node, so every GPU computes the whole video",
              file=sys.stderr)
    try:
        result = runtime.run_workflow(prompt, outputs=())
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"world_size": world, "outputs": result.outputs}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
