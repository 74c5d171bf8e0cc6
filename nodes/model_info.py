from comfy_api.latest import io

from .adapters import describe


class USVModelInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="USVModelInfo",
            display_name="USV Model Info",
            category="USV",
            description="Names the model's architecture and variant, its token layout, and whether USV can patch it.",
            inputs=[io.Model.Input("model")],
            outputs=[io.String.Output(display_name="info")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        text = describe(model).summary()
        return io.NodeOutput(text, ui={"text": [text]})
