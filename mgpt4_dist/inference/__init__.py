"""Inference without DeepSpeed or a process group: load a consolidated folder, chat about an image.

    from mgpt4_dist.inference import load_model, Chat
    bundle = load_model("out/", device="cuda", dtype=torch.float16)
    chat = Chat(bundle)
    chat.ask("What is in the picture?")  # after chat.upload_image("cat.jpg")
"""
from mgpt4_dist.inference.conversation import Conversation, new_conversation
from mgpt4_dist.inference.generate import Chat, ImageError, generate, load_image
from mgpt4_dist.inference.loader import LoadedModel, load_model

__all__ = ["Chat", "Conversation", "ImageError", "LoadedModel", "generate", "load_image", "load_model",
           "new_conversation"]
