"""The HTTP face on loopback: a real gateway (with its local Ray) and edge worker, each with HTTP on and a
bearer token; JSON, server-sent events, A1111's txt2img, error statuses, /metrics, and the page in a headless
Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import PIL.Image
import pytest

from cloud_worker.gateway import GatewayConfig, running_gateway
from edge_worker.server import EdgeConfig, running_edge
from hybrid_sd.credentials import Security
from hybrid_sd.errors import QueueFullError
from hybrid_sd.limits import RequestLimits
from hybrid_sd.v1 import hybrid_sd_pb2 as pb
from hybrid_sd.v1 import hybrid_sd_pb2_grpc as pb_grpc
from hybrid_sd.web.statuses import error_of
from tests.browser import chromium_driver
from tests.serving import channel, free_port

TOKEN = "s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
LIMITS = RequestLimits(max_steps=1000)
SCREENSHOTS = Path(__file__).resolve().parents[1] / "out"


@pytest.fixture(scope="module")
def cluster(loop, pair_specs):
    """Edge worker and gateway pointing at each other, and an edge worker with no cloud; HTTP on for all."""
    spec, security = pair_specs["sd1"], Security(token=TOKEN)
    gateway_port = free_port()
    edge, leave_edge = loop.enter(
        running_edge(
            EdgeConfig(
                spec,
                "tiny-sd1",
                port=0,
                cloud=f"127.0.0.1:{gateway_port}",
                security=security,
                cloud_token=TOKEN,
                limits=LIMITS,
                http_port=0,
            )
        )
    )
    alone, leave_alone = loop.enter(running_edge(EdgeConfig(spec, port=0, security=security, http_port=0)))
    gateway, leave_gateway = loop.enter(
        running_gateway(
            GatewayConfig(
                "tiny-sd1",
                spec,
                f"127.0.0.1:{edge.port}",
                port=gateway_port,
                ray_num_cpus=2,
                security=security,
                edge_token=TOKEN,
                limits=LIMITS,
                http_port=0,
            )
        )
    )
    yield {"gateway": gateway, "edge": edge, "alone": alone}
    leave_gateway()
    leave_alone()
    leave_edge()


def call(server, path: str, body: dict | None = None, headers: dict | None = None, method: str | None = None):
    """(status, parsed JSON or text) of an HTTP call to ``server``'s HTTP face, with the token unless
    ``headers`` say otherwise."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}{path}",
        data=data,
        headers={"content-type": "application/json", **(AUTH if headers is None else headers)},
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, text, kind = response.status, response.read().decode(), response.headers["content-type"]
    except urllib.error.HTTPError as error:
        status, text, kind = error.code, error.read().decode(), error.headers["content-type"]
    return status, json.loads(text) if kind.startswith("application/json") else text


def image_of(data: str) -> PIL.Image.Image:
    image = PIL.Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


@pytest.mark.parametrize("entry", ["gateway", "edge"])
def test_generate_json_both_spellings(cluster, entry):
    status, answer = call(
        cluster[entry],
        "/v1/generate",
        {"prompt": "a circle", "numInferenceSteps": 4, "switch_step": 2, "seed": 5, "scheduler": "euler"},
    )
    assert status == 200, answer
    assert image_of(answer["image"]).size == (64, 64) and answer["mime_type"] == "image/png"
    assert answer["switch_step"] == 2 and answer["cloud_unet_evaluations"] == 2 and answer["seed"] == "5"
    assert answer["timings"]["total"] > 0 and not answer["edge_fallback"]


def test_a1111_txt2img_gives_the_grpc_image(cluster):
    body = {
        "prompt": "a red square",
        "negative_prompt": "blurry",
        "steps": 6,
        "cfg_scale": 5,
        "seed": 1234,
        "width": 64,
        "height": 64,
        "sampler_name": "DPM++ 2M",
        "refiner_switch_at": 0.5,
        "batch_size": 1,
    }
    status, answer = call(cluster["gateway"], "/sdapi/v1/txt2img", body)
    assert status == 200, answer
    info = json.loads(answer["info"])
    assert info["seed"] == 1234 and info["all_seeds"] == [1234] and answer["parameters"] == body
    assert info["hybrid_sd"]["switch_step"] == 3
    grpc_answer = pb_grpc.HybridDiffusionStub(channel(cluster["gateway"].port)).Generate(
        pb.GenerateRequest(
            prompt="a red square",
            negative_prompt="blurry",
            num_inference_steps=6,
            guidance_scale=5,
            seed=1234,
            width=64,
            height=64,
            scheduler="dpm++2m",
            switch_step=3,
        ),
        timeout=120,
        metadata=tuple(AUTH.items()),
    )
    assert base64.b64decode(answer["images"][0]) == grpc_answer.image


def test_a1111_refuses_what_it_cannot_map(cluster):
    status, answer = call(cluster["gateway"], "/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Heun"})
    assert status == 400 and "DPM++ 2M, Euler a" in answer["error"]["message"]
    status, answer = call(cluster["gateway"], "/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True})
    assert status == 400 and "enable_hr" in answer["error"]["message"]


def sse_events(server, query: dict) -> list[tuple[str, dict]]:
    url = f"http://127.0.0.1:{server.http_port}/v1/generate/stream?{urllib.parse.urlencode(query)}"
    request = urllib.request.Request(url, headers=AUTH)
    events, name = [], None
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response:
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


@pytest.mark.parametrize("entry", ["gateway", "edge"])
def test_sse_progress_with_previews_then_result(cluster, entry):
    query = {"prompt": "a circle", "num_inference_steps": 4, "switch_step": 2, "seed": 1, "scheduler": "euler"}
    events = sse_events(cluster[entry], {**query, "previewEvery": 2})
    progress = [(data["stage"], data["step"], data["total"]) for name, data in events if name == "progress"]
    assert progress == [
        ("cloud_denoise", 1, 4),
        ("cloud_denoise", 2, 4),
        ("edge_denoise", 3, 4),
        ("edge_denoise", 4, 4),
    ]
    previews = {data["step"]: data["preview_png"] for name, data in events if name == "progress"}
    assert previews[1] == previews[3] == ""  # every 2 evaluations, from the cloud and from the edge
    for step in (2, 4):
        assert image_of(previews[step]).size[0] <= 64
    name, result = events[-1]
    assert name == "result" and image_of(result["image"]).size == (64, 64)


def test_error_statuses(cluster):
    gateway, edge = cluster["gateway"], cluster["edge"]
    status, answer = call(gateway, "/v1/generate", {"prompt": "x", "num_inference_steps": 4, "switch_step": 9})
    assert status == 400 and "switch_step" in answer["error"]["message"]
    assert answer["error"]["code"] == "INVALID_ARGUMENT"
    status, answer = call(gateway, "/v1/generate", {"prompt": "x", "steps": 4})
    assert status == 400 and "steps" in answer["error"]["message"]
    status, answer = call(gateway, "/v1/generate", {"prompt": "x"}, headers={})
    assert status == 401 and answer["error"]["code"] == "UNAUTHENTICATED"
    status, answer = call(gateway, "/v1/generate", {"prompt": "x"}, headers={"authorization": "Bearer wrong"})
    assert status == 401
    status, answer = call(cluster["alone"], "/v1/generate", {"prompt": "x", "num_inference_steps": 2, "switch_step": 1})
    assert status == 503 and answer["error"]["code"] == "UNAVAILABLE"
    slow = {"prompt": "slow", "num_inference_steps": 900, "switch_step": 0}
    status, answer = call(edge, "/v1/generate", slow, headers={**AUTH, "x-request-timeout": "0.5"})
    assert status == 504 and answer["error"]["code"] == "DEADLINE_EXCEEDED"
    # the queue-full and internal statuses, which no tiny cluster reaches on demand, through the same table
    assert error_of(QueueFullError("full"))[0] == 429
    assert error_of(RuntimeError("boom")) == (
        500,
        {"error": {"status": 500, "code": "INTERNAL", "message": "internal error: RuntimeError: boom"}},
    )


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of Prometheus' text format (0 if absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and ",".join(sorted((match.group(1) or "").split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def test_metrics_move_after_a_request(cluster):
    gateway = cluster["gateway"]
    status, before = call(gateway, "/metrics")
    assert status == 200
    http_ok = dict(protocol="http", method="POST /v1/generate", status="200")
    grpc_ok = dict(protocol="grpc", method="/hybrid_sd.v1.HybridDiffusion/Generate", status="OK")
    call(gateway, "/v1/generate", {"prompt": "a circle", "num_inference_steps": 3, "switch_step": 1, "seed": 2})
    pb_grpc.HybridDiffusionStub(channel(gateway.port)).Generate(
        pb.GenerateRequest(prompt="a circle", num_inference_steps=3, switch_step=1, seed=2),
        timeout=60,
        metadata=tuple(AUTH.items()),
    )
    with pytest.raises(grpc.RpcError):
        pb_grpc.HybridDiffusionStub(channel(gateway.port)).Generate(pb.GenerateRequest(prompt="x"), timeout=60)
    status, after = call(gateway, "/metrics")
    assert (
        metric(after, "hybrid_sd_requests_total", **http_ok)
        == metric(before, "hybrid_sd_requests_total", **http_ok) + 1
    )
    assert (
        metric(after, "hybrid_sd_requests_total", **grpc_ok)
        == metric(before, "hybrid_sd_requests_total", **grpc_ok) + 1
    )
    unauthenticated = dict(protocol="grpc", method="/hybrid_sd.v1.HybridDiffusion/Generate", status="UNAUTHENTICATED")
    assert metric(after, "hybrid_sd_requests_total", **unauthenticated) >= 1
    total = dict(stage="total")
    assert (
        metric(after, "hybrid_sd_stage_seconds_count", **total)
        == metric(before, "hybrid_sd_stage_seconds_count", **total) + 2
    )
    assert metric(after, "hybrid_sd_handoff_bytes_count") >= metric(before, "hybrid_sd_handoff_bytes_count") + 2
    for name in ("hybrid_sd_requests_in_flight", "hybrid_sd_queue_depth", "hybrid_sd_edge_fallbacks_total"):
        assert re.search(rf"^{name} ", after, re.MULTILINE), name
    status, edge_metrics = call(cluster["edge"], "/metrics")  # the edge counts the gateway's Refine calls
    assert (
        metric(
            edge_metrics,
            "hybrid_sd_requests_total",
            protocol="grpc",
            method="/hybrid_sd.v1.EdgeRefiner/Refine",
            status="OK",
        )
        >= 2
    )


@pytest.mark.may_skip  # needs Debian's chromium and chromium-driver
def test_the_page_in_a_real_browser(cluster):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium_driver()
    try:
        browser.get(f"http://127.0.0.1:{cluster['gateway'].http_port}/")
        browser.find_element(By.TAG_NAME, "summary").click()
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a red square")
        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("6")
        browser.execute_script(
            "const s = document.getElementById('switch_step'); s.value = 3; s.dispatchEvent(new Event('input'))"
        )
        browser.find_element(By.ID, "generate").click()
        wait = WebDriverWait(browser, 120)

        def finished(driver) -> bool:
            status = driver.find_element(By.ID, "status")
            assert status.get_attribute("class") != "error", status.text
            return status.text == "done"

        wait.until(finished)
        # the progress bar's last state: every UNet evaluation, the cloud's, then the edge's
        cells = [cell.get_attribute("class") for cell in browser.find_elements(By.CSS_SELECTOR, "#progress span")]
        assert set(cells) == {"cloud_denoise", "edge_denoise"} and cells == sorted(cells)
        preview = browser.find_element(By.ID, "preview").get_attribute("src")
        image = browser.find_element(By.ID, "image").get_attribute("src")
        assert preview.startswith("data:image/png;base64,") and image.startswith("data:image/png;base64,")
        assert image_of(image.split(",", 1)[1]).size == (64, 64)
        assert "k = 3 of 6" in browser.find_element(By.ID, "caption").text
        assert browser.find_elements(By.CSS_SELECTOR, "#timings span")
        at = browser.find_element(By.ID, "compare_at")
        at.clear()
        at.send_keys("0, 50%, 100%")
        browser.find_element(By.ID, "compare").click()
        wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, "#comparison figure")) == 3)
        captions = [element.text for element in browser.find_elements(By.CSS_SELECTOR, "#comparison figcaption")]
        assert [caption.split(":")[0] for caption in captions] == ["k = 0", "k = 3", "k = 6"]
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / "page.png"))
    finally:
        browser.quit()
