"""The HTTP API on a bare FastAPI app: start/status/cancel/projects, --api-auth, name checks, 422 problems."""

from __future__ import annotations

import base64
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from ui_helpers import BlockingHost, quick_run_data

from dreambooth_ext import config as schema
from dreambooth_ext.errors import DreamboothError
from dreambooth_ext.ui import JobManager, folder_adapter
from dreambooth_ext.ui.api import PREFIX, parse_credentials, register_api


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def api(tmp_path, ui_models):
    adapter = folder_adapter(ui_models, tmp_path / "work")
    jobs = JobManager()
    app = FastAPI()
    register_api(app, jobs, adapter, None)
    client = TestClient(app)
    client.jobs, client.adapter = jobs, adapter
    yield client
    jobs.shutdown(30)


def wait_until_settled(client, timeout=120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get(f"{PREFIX}/status").json()
        if not status["active"]:
            return status
        time.sleep(0.2)
    raise AssertionError(f"run still active after {timeout}s: {status}")


def test_start_runs_in_the_background_and_status_reports_the_result(api, ui_models, ui_images):
    wrapped = []
    api.adapter.background = lambda body: (wrapped.append(body), body)[1]
    assert api.get(f"{PREFIX}/status").json()["state"] == "idle"
    data = quick_run_data("", ui_images, project="apirun")
    response = api.post(f"{PREFIX}/start", json=data, params={"checkpoint": "tiny.safetensors"})
    assert response.status_code == 200, response.text
    assert response.json()["started"] is True and wrapped  # the host's wrapper was applied to the thread body
    status = wait_until_settled(api)
    result = ui_models / "Stable-diffusion" / "apirun" / "apirun_2.safetensors"
    assert status["state"] == "finished" and status["checkpoints"] == [str(result)], status
    assert result.is_file() and [s for s, _ in status["losses"]] == [1, 2]


def test_second_start_is_409_and_cancel_stops_the_active_run(api, tmp_path, ui_images):
    blocking = BlockingHost(tmp_path / "b")
    config = schema.from_dict(quick_run_data(tmp_path / "x.safetensors", ui_images, project="busy"))
    api.jobs.start_background(config, blocking)
    assert blocking.entered.wait(30)
    response = api.post(f"{PREFIX}/start", json=quick_run_data(tmp_path / "y.safetensors", ui_images))
    assert response.status_code == 409 and "already active" in response.json()["detail"]["message"]
    response = api.post(f"{PREFIX}/cancel")
    assert response.status_code == 200 and response.json()["cancelling"] is True
    blocking.release.set()
    status = wait_until_settled(api)
    assert status["project"] == "busy" and not status["active"]
    assert api.post(f"{PREFIX}/cancel").json()["cancelling"] is False


def test_invalid_config_is_422_listing_every_problem(api, ui_images, tmp_path):
    data = quick_run_data(tmp_path / "m.safetensors", ui_images, resolution=100, learning_rate="fast",
                          unknown_thing=1)
    response = api.post(f"{PREFIX}/start", json=data)
    assert response.status_code == 422
    problems = response.json()["detail"]["problems"]
    assert any(p.startswith("learning_rate = 'fast'") for p in problems)
    assert any(p.startswith("unknown_thing: unknown option") for p in problems)
    assert any(p.startswith("resolution = 100: must be a multiple of 64") for p in problems)  # all in one reply
    response = api.post(f"{PREFIX}/start", json=quick_run_data(tmp_path / "m.safetensors", ui_images, resolution=100,
                                                               concept={"instance_dir": ""}))
    problems = response.json()["detail"]["problems"]
    assert response.status_code == 422 and len(problems) == 2
    assert api.post(f"{PREFIX}/start", json=[1, 2]).status_code == 422
    assert api.jobs.active is None


@pytest.mark.parametrize("name", ["../escape", "/abs/path", "a\\b", "C:x", ".."])
def test_project_names_that_are_paths_are_rejected(api, ui_images, tmp_path, name):
    response = api.post(f"{PREFIX}/start", json=quick_run_data(tmp_path / "m.safetensors", ui_images, project=name))
    assert response.status_code == 422, response.text
    assert any("project_name" in p for p in response.json()["detail"]["problems"])
    assert api.jobs.active is None
    if "/" not in name:  # a '/' cannot reach the {name} route at all
        assert api.get(f"{PREFIX}/projects/{name}").status_code in (404, 422)


def test_projects_lists_saved_projects_and_reads_one(api, ui_images, tmp_path):
    assert api.get(f"{PREFIX}/projects").json() == {"projects": []}
    config = schema.from_dict(quick_run_data(tmp_path / "m.safetensors", ui_images, project="saved one"))
    schema.save_json(config, tmp_path / "work" / "saved one" / "project.json")
    listed = api.get(f"{PREFIX}/projects").json()["projects"]
    assert [p["name"] for p in listed] == ["saved one"] and listed[0]["resumable"] is False
    assert schema.from_dict(api.get(f"{PREFIX}/projects/saved one").json()) == config
    assert api.get(f"{PREFIX}/projects/missing").status_code == 404
    assert api.get(f"{PREFIX}/projects/..%5Cx").status_code == 422
    assert api.get(f"{PREFIX}/projects/bad%7Cname").status_code == 422


def test_a_missing_image_folder_is_422_before_the_run_starts(api, ui_models, ui_images, tmp_path):
    base = ui_models / "Stable-diffusion" / "tiny.safetensors"
    data = quick_run_data(base, ui_images, concept={"instance_dir": str(tmp_path / "nowhere")})
    response = api.post(f"{PREFIX}/start", json=data)
    assert response.status_code == 422, response.text
    assert "instance_dir" in response.text and "does not exist" in response.text
    assert api.jobs.active is None and api.get(f"{PREFIX}/status").json()["state"] == "idle"


def test_unknown_checkpoint_is_422(api, ui_images):
    response = api.post(f"{PREFIX}/start", json=quick_run_data("", ui_images), params={"checkpoint": "../x.ckpt"})
    assert response.status_code == 422 and "not in" in response.json()["detail"]["problems"][0]


def test_api_auth_is_enforced_when_set(tmp_path, ui_models):
    app = FastAPI()
    register_api(app, JobManager(), folder_adapter(ui_models, tmp_path / "work"), "alice:s3cret,bob:pa:ss")
    client = TestClient(app)
    for method, path in (("get", "/status"), ("post", "/cancel"), ("get", "/projects"), ("post", "/start")):
        assert getattr(client, method)(PREFIX + path).status_code == 401
        response = getattr(client, method)(PREFIX + path, headers=basic("alice", "wrong"))
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Basic"
        assert getattr(client, method)(PREFIX + path, headers=basic("mallory", "s3cret")).status_code == 401
    assert client.get(f"{PREFIX}/status", headers=basic("alice", "s3cret")).status_code == 200
    assert client.get(f"{PREFIX}/status", headers=basic("bob", "pa:ss")).status_code == 200  # ':' in a password


def test_credentials_are_checked_before_the_body_and_the_body_is_capped(tmp_path, ui_models):
    """A body is read only after the credentials check (FastAPI parsed it first: an unauthenticated caller got a
    422 echoing what it sent), and at most 1 MB of it (see test_api_limits.py for the same over real servers)."""
    app = FastAPI()
    register_api(app, JobManager(), folder_adapter(ui_models, tmp_path / "work"), "alice:s3cret")
    client = TestClient(app)
    for path in ("/start", "/cancel"):
        response = client.post(PREFIX + path, content=b"{not json")
        assert response.status_code == 401 and "not json" not in response.text
    refused = client.post(f"{PREFIX}/start", content=bytes(2 << 20), headers=basic("alice", "s3cret"))
    assert refused.status_code == 413 and "1 MB" in refused.json()["detail"]["message"]
    unread = client.post(f"{PREFIX}/start", content=b"{not json", headers=basic("alice", "s3cret"))
    assert unread.status_code == 422 and "not JSON" in unread.json()["detail"]["problems"][0]


def test_no_auth_when_unset_and_routes_registered_once(tmp_path, ui_models):
    app = FastAPI()
    adapter = folder_adapter(ui_models, tmp_path / "work")
    register_api(app, JobManager(), adapter, None)
    register_api(app, JobManager(), adapter, None)  # the host calls on_app_started again after a reload
    assert sum(getattr(r, "path", "") == f"{PREFIX}/status" for r in app.routes) == 1
    assert TestClient(app).get(f"{PREFIX}/status").status_code == 200


def test_credentials_parsing():
    assert parse_credentials("a:b, c:d:e") == {"a": "b", "c": "d:e"}
    assert parse_credentials(None) == {} and parse_credentials("") == {}
    with pytest.raises(DreamboothError, match="user:password"):
        parse_credentials("nocolon")


def test_a_stopped_run_is_listed_and_start_and_resume_are_checked_before_they_begin(api, ui_images, ui_models):
    """After a restart the stopped run is in the list with its options; Start on it (which would replace its state)
    and Resume of a project with nothing stopped are refused as a 422, before anything runs."""
    from dreambooth_ext.train.run import TrainingRun

    data = quick_run_data("", ui_images, project="halfway", max_train_steps=3)
    config, host = api.adapter.prepare(schema.from_dict(data), "tiny.safetensors")
    holder = {}
    holder["run"] = TrainingRun(config, host, on_progress=lambda p: p.step == 1 and holder["run"].cancel())
    assert holder["run"].run().status == "cancelled"

    listed = api.get(f"{PREFIX}/projects").json()["projects"]
    assert [(p["name"], p["resumable"], p["stopped_at"]) for p in listed] == [("halfway", True, 1)]
    assert schema.from_dict(api.get(f"{PREFIX}/projects/halfway").json()) == config

    refused = api.post(f"{PREFIX}/start", json=data, params={"checkpoint": "tiny.safetensors"})
    assert refused.status_code == 422 and "Resume continues it" in refused.json()["detail"]["problems"][0]
    nothing = api.post(f"{PREFIX}/start", json=dict(data, project_name="fresh"),
                       params={"checkpoint": "tiny.safetensors", "resume": True})
    assert nothing.status_code == 422 and "no stopped run" in nothing.json()["detail"]["problems"][0]
    assert api.get(f"{PREFIX}/status").json()["state"] == "idle"  # neither became a run

    resumed = api.post(f"{PREFIX}/start", json=data, params={"checkpoint": "tiny.safetensors", "resume": True})
    assert resumed.status_code == 200, resumed.text
    status = wait_until_settled(api)
    assert status["state"] == "finished" and status["step"] == 3, status
    assert api.get(f"{PREFIX}/projects").json() == {"projects": []}  # finished: nothing stopped, nothing saved
