"""The web chat demo behind `mgpt4-demo`: a gradio page and a `/answer` API over one loaded model.

Owns the page (image upload, multi-turn chat in the original template, generation controls),
each browser tab's conversation, token streaming from a generation thread and the stop button.
It takes a model that `inference.loader.load_model` built and knows no command line.

Offline by construction: gradio's analytics are off and the theme names system fonts only
(gradio's themes may otherwise link web fonts), so the page fetches nothing but this server.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

from transformers.generation.streamers import BaseStreamer

from mgpt4_dist.errors import MissingExtraError, UserError
from mgpt4_dist.inference.conversation import cut_at_stops
from mgpt4_dist.inference.generate import Chat

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'mgpt4_dist[demo]'"


def import_gradio():
    """gradio with its telemetry off, or a MissingExtraError that names the extra to install."""
    # Read when gradio is imported: the version check and usage analytics would call out to the internet.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError as e:
        raise MissingExtraError(f"the web demo needs gradio ({e}): {INSTALL_HINT}", extra="demo") from None
    return gradio


@dataclass
class GenerationSettings:
    """The controls' starting values; the `/answer` API uses them for everything but temperature."""
    max_new_tokens: int = 300
    temperature: float = 1.0
    num_beams: int = 1


class GenerationStopped(Exception):
    """Raised inside the LLM's decoding loop when the user pressed stop (it ends `generate`)."""


class AnswerStreamer(BaseStreamer):
    """Collects the tokens `generate` picks and queues the answer text so far after each one.

    The queued text is cut at the conversation's stop strings, and a tail that may be the start of
    one (`#`, `##`) is held back, so the page never flashes the separator.
    """

    def __init__(self, tokenizer, stops: Sequence[str], stop_requested: threading.Event):
        self.tokenizer, self.stops, self.stop_requested = tokenizer, list(stops) + ["</s>"], stop_requested
        self.token_ids: List[int] = []
        self.updates: "queue.Queue[Optional[str]]" = queue.Queue()
        self._prompt_seen = False

    def put(self, value) -> None:
        if self.stop_requested.is_set():
            raise GenerationStopped()
        if not self._prompt_seen:  # generate hands over the prompt's ids first (none with inputs_embeds)
            self._prompt_seen = True
            return
        self.token_ids.extend(int(t) for t in value.reshape(-1).tolist())
        self.updates.put(self.text())

    def end(self) -> None:
        pass  # AnswerStream ends the queue itself, also when generate raises

    def text(self) -> str:
        return cut_at_stops(self.tokenizer.decode(self.token_ids, skip_special_tokens=False), self.stops,
                            hold_partial_stop=True)


class AnswerStream:
    """Iterate for the answer so far as it grows; the last value is the answer `Chat.ask` returns
    (or, after stop, the partial answer, which then joins the conversation). Greedy and sampled
    decoding stream token by token; beam search (which transformers does not stream) yields once."""

    def __init__(self, chat: Chat, question: str, stop_requested: threading.Event, **generate_kwargs):
        self.chat, self.question, self.stop_requested = chat, question, stop_requested
        self.generate_kwargs = generate_kwargs
        self.stopped = False
        self.num_tokens: Optional[int] = None

    def __iter__(self) -> Iterator[str]:
        if self.generate_kwargs.get("num_beams", 1) > 1:
            yield self.chat.ask(self.question, **self.generate_kwargs)
            return
        streamer = AnswerStreamer(self.chat.bundle.tokenizer, self.chat.conv.stop_strings, self.stop_requested)
        outcome = {}

        def run() -> None:
            try:
                outcome["answer"] = self.chat.ask(self.question, streamer=streamer, **self.generate_kwargs)
            except GenerationStopped:
                outcome["stopped"] = True
            except BaseException as e:  # handed to the consumer's thread below
                outcome["error"] = e
            finally:
                streamer.updates.put(None)

        thread = threading.Thread(target=run, name="mgpt4-demo-generate", daemon=True)
        thread.start()
        try:
            while (text := streamer.updates.get()) is not None:
                yield text
        finally:  # the consumer went away (tab closed, event cancelled): do not decode on for nobody
            if thread.is_alive():
                self.stop_requested.set()
            thread.join()
        self.num_tokens = len(streamer.token_ids)
        if "error" in outcome:
            raise outcome["error"]
        if outcome.get("stopped"):
            self.stopped = True
            partial = streamer.text()
            self.chat.conv.add_answer(partial)  # Chat.ask asked the question before generate stopped
            yield partial
            return
        yield outcome["answer"]


class DemoSession:
    """One browser tab: its Chat (image and turns), the transcript on screen, the stop flag."""

    def __init__(self):
        self.chat: Optional[Chat] = None
        self.image_path: Optional[str] = None
        self.history: List[dict] = []
        self.turns = 0  # questions answered in this conversation (the status names the turn)
        self.stop_requested = threading.Event()


def offline_theme(gr):
    """gradio's default look with system fonts only (no web font is fetched)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def describe_model(bundle, model_name: str) -> str:
    params = next(bundle.model.parameters())
    llm = os.path.basename(os.path.normpath(bundle.cfg.model.llm_path or "")) or "LLM"
    return (f"**Model** `{model_name}` (LLM `{llm}`, {bundle.conversation} template) · **device** "
            f"`{bundle.device}` · `{str(params.dtype).replace('torch.', '')}`")


def build_demo(bundle, model_name: str, settings: Optional[GenerationSettings] = None):
    """The gradio Blocks app over `bundle` (a LoadedModel); launch it with `launch_demo`."""
    gr = import_gradio()
    settings = settings or GenerationSettings()
    # One model, one generation at a time: every event that runs it shares this queue slot.
    model_slot = dict(concurrency_id="model", concurrency_limit=1)

    def new_chat(path: Optional[str]) -> Chat:
        chat = Chat(bundle)
        chat.upload_image(path)
        return chat

    def on_image(path, session):
        session = session or DemoSession()
        session.stop_requested.set()
        session.chat, session.image_path, session.history, session.turns = None, None, [], 0
        if not path:
            return session, None, [], "", "Upload an image to start."
        try:
            session.chat = new_chat(path)
        except UserError as e:
            return session, None, [], "", f"⚠️ {e}"
        session.image_path = path
        return session, path, [], "", "Image loaded: ask a question about it."

    def on_ask(question, session, temperature, num_beams, max_new_tokens):
        history = list(session.history) if session else []
        question = (question or "").strip()
        if session is None or session.chat is None:
            yield history, gr.update(), "⚠️ Upload an image first.", question
            return
        if not question:
            yield history, gr.update(), "⚠️ Type a question first.", question
            return
        session.stop_requested.clear()
        session.turns += 1
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        session.history = history
        yield history, "", "Answering…", ""
        stream = AnswerStream(session.chat, question, session.stop_requested, temperature=float(temperature),
                              num_beams=int(num_beams), max_new_tokens=int(max_new_tokens))
        start = time.perf_counter()
        answer = ""
        try:
            for answer in stream:
                history[-1] = {"role": "assistant", "content": answer}
                yield history, answer, "Answering…", ""
        except UserError as e:
            history[-2:] = []
            session.turns -= 1
            yield history, "", f"⚠️ {e}", ""
            return
        took = f"{time.perf_counter() - start:.1f} s"
        tokens = f"{stream.num_tokens} tokens, " if stream.num_tokens is not None else ""
        status = (f"Stopped turn {session.turns}: the partial answer stays in the conversation ({tokens}{took})."
                  if stream.stopped else f"Answered turn {session.turns} ({tokens}{took}).")
        yield history, answer, status, ""

    def on_stop(session):
        if session is not None:
            session.stop_requested.set()

    def on_reset(session):
        if session is None or session.image_path is None:
            return session, [], "", "Upload an image to start."
        session.stop_requested.set()
        session.chat, session.history, session.turns = new_chat(session.image_path), [], 0
        return session, [], "", "Conversation reset: same image, no turns."

    def refuse(message: str):
        # The caller gets the message; the server log one line, not a traceback.
        log.warning("/answer refused: %s", message)
        return gr.Error(message, print_exception=False)

    def answer(image, question, temperature):
        """One answer about one image (a fresh conversation), as `mgpt4-chat --prompt` gives it."""
        if not image:
            raise refuse("no image given")
        if not (question or "").strip():
            raise refuse("the question is empty")
        try:
            return new_chat(image).ask(question.strip(), temperature=float(temperature), num_beams=settings.num_beams,
                                       max_new_tokens=settings.max_new_tokens)
        except UserError as e:
            raise refuse(str(e)) from None

    with gr.Blocks(title="MiniGPT-4 demo", analytics_enabled=False) as demo:
        session = gr.State(None)
        gr.Markdown("## MiniGPT-4\n" + describe_model(bundle, model_name), elem_id="model-info")
        with gr.Row():
            with gr.Column(scale=1):
                image_file = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="image-upload")
                # No "share" buttons: they post to Hugging Face, and the demo stays on this machine.
                preview = gr.Image(label="Looking at", interactive=False, type="filepath", height=240,
                                   buttons=["download", "fullscreen"])
                temperature = gr.Slider(0.0, 2.0, value=settings.temperature, step=0.05, label="Temperature",
                                        info="0 = greedy (deterministic)", elem_id="temperature")
                num_beams = gr.Slider(1, 8, value=settings.num_beams, step=1, label="Beams", elem_id="beams")
                max_new_tokens = gr.Slider(1, max(1024, settings.max_new_tokens), value=settings.max_new_tokens,
                                           step=1, label="Max new tokens", elem_id="max-new-tokens")
            with gr.Column(scale=2):
                # Plain text: an answer is shown as generated, not as markdown or LaTeX.
                chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", render_markdown=False,
                                     latex_delimiters=[], height=380, buttons=["copy", "copy_all"],
                                     feedback_options=None)
                question = gr.Textbox(label="Question", placeholder="Ask about the image, then Enter",
                                      elem_id="question", lines=1)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    reset = gr.Button("Reset", elem_id="reset")
                status = gr.Markdown("Upload an image to start.", elem_id="status")
                last_answer = gr.Textbox(label="Latest answer (plain text)", interactive=False,
                                         elem_id="last-answer", lines=2)
        # Hidden inputs/output of the `/answer` API (gradio_client calls it by name).
        with gr.Column(visible=False):
            api_image = gr.File(type="filepath")
            api_question = gr.Textbox()
            api_temperature = gr.Number()
            api_answer = gr.Textbox()
            api_trigger = gr.Button()

        private = dict(api_visibility="private")
        image_file.change(on_image, [image_file, session], [session, preview, chatbot, last_answer, status],
                          **model_slot, **private)
        ask_inputs = [question, session, temperature, num_beams, max_new_tokens]
        ask_outputs = [chatbot, last_answer, status, question]
        for trigger in (send.click, question.submit):
            trigger(on_ask, ask_inputs, ask_outputs, **model_slot, **private)
        stop.click(on_stop, [session], [], queue=False, **private)
        reset.click(on_reset, [session], [session, chatbot, last_answer, status], **model_slot, **private)
        api_trigger.click(answer, [api_image, api_question, api_temperature], [api_answer], api_name="answer",
                          **model_slot)
    return demo


def launch_demo(demo, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve `demo` on host:port (offline theme, no share link, no server-side rendering process)."""
    gr = import_gradio()
    demo.queue(default_concurrency_limit=1)
    return demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False,
                       theme=offline_theme(gr), footer_links=["api"], prevent_thread_lock=not block,
                       quiet=True, show_error=False)
