"""What `finpulse demo` prepares before it starts its processes (the demo itself runs by hand: `make demo`)."""
from stream.demo import fresh_store


def test_each_demo_run_starts_its_receiver_empty_and_keeps_the_run_before(tmp_path):
    store = tmp_path / "received.jsonl"
    assert fresh_store(store) == store and not store.exists()          # a first run: nothing to set aside
    store.write_text('{"id": "msg_first_run"}\n')
    assert fresh_store(store) == store and not store.exists()
    assert (tmp_path / "received.previous.jsonl").read_text() == '{"id": "msg_first_run"}\n'
    store.write_text('{"id": "msg_second_run"}\n')
    fresh_store(store)
    assert (tmp_path / "received.previous.jsonl").read_text() == '{"id": "msg_second_run"}\n'
