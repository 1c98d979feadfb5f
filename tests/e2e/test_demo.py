"""`mgpt4-demo` on the tiny model, as users run it: the console script serving on a free local port,
a real headless Chromium (selenium) that uploads an image and chats, and gradio_client on `/answer`.
Answers equal `mgpt4-chat --temperature 0`'s for the same image and question. Streaming and the
stop mechanism are also checked in-process, where the moment of the stop press can be chosen."""
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

from helpers import BIN, free_port

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import browser  # noqa: E402  (tests/e2e/browser.py, beside this file)

pytestmark = [pytest.mark.slow]

QUESTION = "what is this?"
FOLLOW_UP = "and the color?"
MAX_NEW_TOKENS = 8
STATUS, ANSWER_BOX = "#status", "#last-answer textarea"


def same_text(text: str) -> str:
    # A browser's textarea reports line breaks as \n (HTML's value normalisation); nothing else changes.
    return text.replace("\r\n", "\n").replace("\r", "\n")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = str(tmp_path_factory.mktemp("img") / "red.png")
    Image.new("RGB", (60, 40), (200, 30, 30)).save(path)
    return path


@pytest.fixture(scope="module")
def corrupt_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "broken.jpg"
    path.write_bytes(b"\xff\xd8 this is not a jpeg")
    return str(path)


@pytest.fixture(scope="module")
def chat_answer(tiny_model_dir, image):
    """What `mgpt4-chat --temperature 0` answers (stdout is the answer and one newline)."""
    proc = subprocess.run([os.path.join(BIN, "mgpt4-chat"), "--model", tiny_model_dir, "--image", image, "--prompt",
                           QUESTION, "--temperature", "0", "--max-new-tokens", str(MAX_NEW_TOKENS)],
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    answer = proc.stdout.decode("utf-8")
    assert answer.endswith("\n") and answer.strip()
    return answer[:-1]


@dataclass
class DemoServer:
    url: str
    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


@pytest.fixture(scope="module")
def demo(tiny_model_dir, tmp_path_factory):
    """`mgpt4-demo` serving the tiny model on a free port, greedy and 8 new tokens by default."""
    base = tmp_path_factory.mktemp("demo")
    port = free_port()
    log_path = str(base / "server.log")
    env = {**os.environ, "GRADIO_TEMP_DIR": str(base / "uploads")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([os.path.join(BIN, "mgpt4-demo"), "--model", tiny_model_dir, "--port", str(port),
                                 "--temperature", "0", "--max-new-tokens", str(MAX_NEW_TOKENS)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    server = DemoServer(f"http://127.0.0.1:{port}/", log_path)
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mgpt4-demo exited ({proc.returncode}):\n{server.log()[-4000:]}")
            try:
                with urllib.request.urlopen(server.url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError(f"mgpt4-demo did not serve {server.url}:\n{server.log()[-4000:]}")
            time.sleep(0.5)
        assert f"serving {tiny_model_dir} on cpu at http://127.0.0.1:{port}" in server.log()
        yield server
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C, as a user stops it
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in server.log(), server.log()[-4000:]


@pytest.fixture(scope="module")
def driver():
    reason = browser.ensure_installed()
    if reason:
        pytest.skip(reason)
    with browser.headless_chromium() as d:
        yield d


def wait_for(driver, condition, what: str, timeout: float = 120):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition())
    except TimeoutException:
        raise AssertionError(f"page never showed {what}; status: {text_of(driver, STATUS)!r}") from None


def text_of(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, css)
    if not found:
        return ""
    return found[0].get_property("value") if found[0].tag_name == "textarea" else found[0].text


def open_page(driver, demo: DemoServer) -> None:
    driver.get(demo.url)
    wait_for(driver, lambda: "Upload an image" in text_of(driver, STATUS), "the start message", timeout=60)


def upload(driver, path: str) -> None:
    """Choose `path` in the image box (clearing the file it shows first, with its clear button)."""
    from selenium.webdriver.common.by import By

    for clear in driver.find_elements(By.CSS_SELECTOR, "#image-upload button[aria-label='Clear']"):
        clear.click()
    chooser = "#image-upload input[type=file]"
    wait_for(driver, lambda: driver.find_elements(By.CSS_SELECTOR, chooser), "the file chooser", timeout=30)
    driver.find_element(By.CSS_SELECTOR, chooser).send_keys(path)


def ask(driver, question: str, expect_status: str) -> str:
    """Type `question` (replacing what the box holds), press Send, wait for the status; the answer box.
    `expect_status` must differ from the status before (hence the turn numbers)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, "#question textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    if question:
        box.send_keys(question)
    driver.find_element(By.CSS_SELECTOR, "#send").click()
    wait_for(driver, lambda: expect_status in text_of(driver, STATUS), repr(expect_status))
    return text_of(driver, ANSWER_BOX)


def expected_turns(model_dir: str, image: str, questions):
    from mgpt4_dist.inference import Chat, load_model

    chat = Chat(load_model(model_dir, device="cpu"))
    chat.upload_image(image)
    return [chat.ask(q, temperature=0, max_new_tokens=MAX_NEW_TOKENS) for q in questions]


def test_browser_chat_answers_as_mgpt4_chat(demo, driver, image, chat_answer, tiny_model_dir, tmp_path):
    from selenium.webdriver.common.by import By

    open_page(driver, demo)
    info = text_of(driver, "#model-info")
    assert os.path.basename(tiny_model_dir) in info and "cpu" in info and "vicuna0" in info
    upload(driver, image)
    wait_for(driver, lambda: "Image loaded" in text_of(driver, STATUS), "the image loaded")
    assert same_text(ask(driver, QUESTION, "Answered turn 1")) == same_text(chat_answer)
    # The second turn sees the first, in the original template (as mgpt4-chat's interactive session).
    _, second = expected_turns(tiny_model_dir, image, [QUESTION, FOLLOW_UP])
    assert same_text(ask(driver, FOLLOW_UP, "Answered turn 2")) == same_text(second)
    conversation = text_of(driver, "#chatbot")
    assert QUESTION in conversation and FOLLOW_UP in conversation
    driver.save_screenshot(str(tmp_path / "demo.png"))
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    # Reset: same image, no turns, so the first question gets the first answer again.
    driver.find_element(By.CSS_SELECTOR, "#reset").click()
    wait_for(driver, lambda: "Conversation reset" in text_of(driver, STATUS), "the reset")
    assert FOLLOW_UP not in text_of(driver, "#chatbot")
    assert same_text(ask(driver, QUESTION, "Answered turn 1")) == same_text(chat_answer)
    # Offline: everything the page loaded (scripts, styles, fonts, API calls) came from this server.
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(demo.url))
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(u.startswith(origin) or u.startswith("data:") for u in loaded), \
        [u for u in loaded if not u.startswith(origin)]
    for tag, attr in (("script", "src"), ("link", "href"), ("img", "src")):
        for element in driver.find_elements(By.CSS_SELECTOR, f"{tag}[{attr}]"):
            url = element.get_attribute(attr)
            assert url.startswith((origin, "data:", "blob:")), f"<{tag} {attr}={url}> is not local"
    assert "Traceback" not in demo.log()


def test_stop_button_ends_a_streaming_answer(demo, driver, image):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_page(driver, demo)
    upload(driver, image)
    wait_for(driver, lambda: "Image loaded" in text_of(driver, STATUS), "the image loaded")
    tokens = driver.find_element(By.CSS_SELECTOR, "#max-new-tokens input[type=number]")
    tokens.send_keys(Keys.CONTROL, "a")
    tokens.send_keys("1024", Keys.TAB)
    # Press Stop the moment the first streamed words show (the tiny model writes 1024 tokens in seconds,
    # faster than a WebDriver round trip, so the page itself watches), and record what was streamed.
    driver.execute_script("""
        window.streamed = [];
        const timer = setInterval(() => {
            const text = document.querySelector('#last-answer textarea').value;
            const status = document.querySelector('#status').innerText;
            if (text && status.includes('Answering')) {
                window.streamed.push(text.length);
                document.querySelector('#stop').click();
                clearInterval(timer);
            }
        }, 5);""")
    ask(driver, QUESTION, "Stopped turn 1")
    partial = text_of(driver, ANSWER_BOX)
    assert driver.execute_script("return window.streamed") and partial  # streamed before it ended
    status = text_of(driver, STATUS)
    assert "partial answer stays" in status and "1024 tokens" not in status
    assert "Traceback" not in demo.log()


def test_bad_input_gets_a_message_in_the_page(demo, driver, image, corrupt_image, chat_answer):
    open_page(driver, demo)
    ask(driver, QUESTION, "Upload an image first")
    upload(driver, corrupt_image)
    wait_for(driver, lambda: "cannot read image" in text_of(driver, STATUS), "the unreadable-image message")
    upload(driver, image)
    wait_for(driver, lambda: "Image loaded" in text_of(driver, STATUS), "the image loaded")
    ask(driver, "   ", "Type a question first")
    # The page still works after all that.
    assert same_text(ask(driver, QUESTION, "Answered turn 1")) == same_text(chat_answer)
    assert "Traceback" not in demo.log()


def test_answer_api_matches_mgpt4_chat(demo, image, corrupt_image, chat_answer):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(demo.url, verbose=False)
    assert client.predict(handle_file(image), QUESTION, 0.0, api_name="/answer") == chat_answer
    with pytest.raises(AppError, match="the question is empty"):
        client.predict(handle_file(image), "  ", 0.0, api_name="/answer")
    with pytest.raises(AppError, match="cannot read image"):
        client.predict(handle_file(corrupt_image), QUESTION, 0.0, api_name="/answer")
    log = demo.log()
    assert "Traceback" not in log and "/answer refused: the question is empty" in log


class PressStopAt(threading.Event):
    """The stop flag as a user sets it while token `k` is being handed over (the streamer checks
    it once for the prompt, then once per token)."""

    def __init__(self, k: int):
        super().__init__()
        self.checks, self.k = 0, k

    def is_set(self) -> bool:
        self.checks += 1
        return self.checks > self.k or super().is_set()


def test_stream_grows_to_the_answer_and_stop_keeps_the_partial(tiny_model_dir, image):
    from mgpt4_dist.inference import Chat, load_model
    from mgpt4_dist.inference.demo import AnswerStream

    bundle = load_model(tiny_model_dir, device="cpu")

    def fresh_chat():
        chat = Chat(bundle)
        chat.upload_image(image)
        return chat

    gen = dict(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS, num_beams=1)
    full = AnswerStream(fresh_chat(), QUESTION, threading.Event(), **gen)
    streamed = list(full)
    assert streamed[-1] == fresh_chat().ask(QUESTION, **gen) and not full.stopped
    assert len(streamed) == full.num_tokens + 1 and full.num_tokens > 3  # one update per token, then the answer

    chat = fresh_chat()
    stopped = AnswerStream(chat, QUESTION, PressStopAt(4), **gen)
    partial = list(stopped)
    assert stopped.stopped and stopped.num_tokens == 3
    assert partial[-1] == streamed[2]  # the text of the first three tokens
    assert chat.conv.messages[-1] == (chat.conv.roles[1], partial[-1])  # kept as the assistant's turn
    assert chat.ask(FOLLOW_UP, **gen)  # the conversation goes on


def test_missing_gradio_is_a_clear_error(tiny_model_dir):
    # gradio made unimportable in this one process, as in an install without the [demo] extra.
    code = ("import sys; sys.modules['gradio'] = None; from mgpt4_dist.cli.demo import main; "
            f"sys.exit(main(['--model', {tiny_model_dir!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "mgpt4-demo: error:" in proc.stderr and "pip install 'mgpt4_dist[demo]'" in proc.stderr


def test_taken_port_is_a_clear_error(tiny_model_dir, demo):
    port = urlsplit(demo.url).port
    proc = subprocess.run([os.path.join(BIN, "mgpt4-demo"), "--model", tiny_model_dir, "--port", str(port)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"cannot serve at http://127.0.0.1:{port}" in proc.stderr
