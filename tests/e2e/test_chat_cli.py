"""`mgpt4-chat` on the tiny model: one-shot answer, an interactive session through a pty, the
conversation template, and clear errors for bad images."""
import os
import pty
import select
import subprocess
import time

import pytest

from helpers import BIN, TINY_STAGE1

pytestmark = [pytest.mark.slow]

GREEDY = ["--temperature", "0", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = str(tmp_path_factory.mktemp("img") / "red.png")
    Image.new("RGB", (60, 40), (200, 30, 30)).save(path)
    return path


def chat(*args):
    return subprocess.run([os.path.join(BIN, "mgpt4-chat"), *args], capture_output=True, text=True, timeout=300)


def expected_answers(model_dir, image, questions):
    from mgpt4_dist.inference import Chat, load_model

    c = Chat(load_model(model_dir, device="cpu"))
    c.upload_image(image)
    return [c.ask(q, temperature=0, max_new_tokens=6) for q in questions], c.conv.prompt_for_answer()


def test_template_matches_the_original_demo():
    from mgpt4_dist.inference.conversation import new_conversation

    conv = new_conversation("vicuna0")
    conv.add_image()
    conv.ask("What is it?")
    assert conv.prompt_for_answer() == (
        "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide it "
        "to you. Please answer my questions.###Human: <Img><ImageHere></Img> What is it?###Assistant: ")
    conv.add_answer("A cat.")
    conv.ask("Color?")
    assert conv.prompt_for_answer().endswith("What is it?###Assistant: A cat.###Human: Color?###Assistant: ")
    llama = new_conversation("llama2")
    llama.add_image()
    llama.ask("What is it?")
    assert llama.prompt_for_answer().endswith(
        "questions.<s>[INST] <Img><ImageHere></Img> What is it? [/INST] ")


def test_one_shot_answer_matches_the_api(model_dir, image):
    proc = chat("--model", model_dir, "--image", image, "--prompt", "what is this?", *GREEDY)
    assert proc.returncode == 0, proc.stderr
    (answer,), _ = expected_answers(model_dir, image, ["what is this?"])
    assert proc.stdout.strip() == answer
    assert "Traceback" not in proc.stderr


def read_until(fd, marker, timeout=120):
    buf, end = b"", time.time() + timeout
    while marker.encode() not in buf:
        if time.time() > end:
            raise AssertionError(f"no {marker!r} in {buf[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf.decode(errors="replace")


def test_interactive_session_in_a_terminal(model_dir, image):
    questions = ["what is this?", "and the color?"]
    answers, _ = expected_answers(model_dir, image, questions)
    master, slave = pty.openpty()
    proc = subprocess.Popen([os.path.join(BIN, "mgpt4-chat"), "--model", model_dir, "--image", image, *GREEDY],
                            stdin=slave, stdout=slave, stderr=subprocess.PIPE, close_fds=True)
    os.close(slave)
    try:
        banner = read_until(master, "You: ")
        assert "vicuna0 template" in banner
        transcript = []
        for q in questions:
            os.write(master, (q + "\n").encode())
            transcript.append(read_until(master, "You: "))
        os.write(master, b"\x04")  # Ctrl-D ends the session
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    for text, answer in zip(transcript, answers):  # the second answer saw the first turn
        assert f"Assistant: {answer}".strip() in text.replace("\r\n", "\n")


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_bad_image_is_a_clear_error(model_dir, tmp_path, kind):
    path = str(tmp_path / "img.jpg")
    if kind == "corrupt":
        open(path, "wb").write(b"\xff\xd8 this is not a jpeg")
    proc = chat("--model", model_dir, "--image", path, "--prompt", "hi", *GREEDY)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert ("image not found" if kind == "missing" else "cannot read image") in proc.stderr


def test_quantization_is_refused_on_cpu(model_dir, image):
    proc = chat("--model", model_dir, "--image", image, "--prompt", "hi", "--device", "cpu", "--quantization", "8bit")
    assert proc.returncode == 2 and "CUDA" in proc.stderr and "Traceback" not in proc.stderr
