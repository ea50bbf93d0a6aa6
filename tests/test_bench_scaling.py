"""`train.bench_scaling` and `train.bench_gpu` end to end on small sizes: the rows, the files, and what the
compiled programs say (work per device falls as 1/D in strong scaling and stays put in weak scaling)."""

import json
import os

import pytest

from train import bench_gpu, bench_scaling


@pytest.fixture(autouse=True)
def _keep_environment(monkeypatch):
    """The entry points set XLA_FLAGS and JAX_PLATFORMS for a fresh process: restore them after."""
    for name in ("XLA_FLAGS", "JAX_PLATFORMS"):
        monkeypatch.setenv(name, os.environ.get(name, ""))


SMALL = ["--rows", "1000", "--fields", "5", "--domains", "3", "--text-dim", "16"]


def test_scaling_rows_files_and_work_per_device(tmp_path):
    rows = bench_scaling.main(
        ["--devices", "1", "4", "--models", "default", "--modes", "weak", "strong", "--meshes", "data",
         "tables-routed", "--batch", "512", "--global-batch", "2048", *SMALL, "--out", str(tmp_path)]
    )  # fmt: skip
    assert {"scaling.json", "scaling.md", "scaling.png"} <= {p.name for p in tmp_path.iterdir()}
    saved = json.loads((tmp_path / "scaling.json").read_text())
    assert len(saved) == len(rows) == 2 * 3  # per mode: the 1-device baseline, data x4, routed x4
    for row in saved:
        assert {"model", "mode", "devices", "flops_per_device", "bytes_per_device", "collective_bytes_per_device",
                "projected_examples_per_s", "efficiency"} <= row.keys()  # fmt: skip
        assert set(row["projected_examples_per_s"]) == {"h100", "tpu-v5e", "tpu-v5p"}
    by = {(r["mode"], r["mesh"], r["devices"]): r for r in saved}
    one = by[("strong", "data", 1)]
    assert one["efficiency"]["h100"] == pytest.approx(1.0) and one["collective_bytes_per_device"] == 0
    strong = by[("strong", "data", 4)]
    assert strong["flops_per_device"] == pytest.approx(one["flops_per_device"] / 4, rel=0.15)
    weak = by[("weak", "data", 4)]
    assert weak["flops_per_device"] == pytest.approx(by[("weak", "data", 1)]["flops_per_device"], rel=0.15)
    assert weak["collectives"]["all-reduce"]["groups"] == [4]  # the gradients, over the data axis
    routed = by[("weak", "tables-routed", 4)]
    # every table in one exchange (ids, vectors, their gradient) and the frozen text table in one (ids, vectors):
    # it is never gathered whole
    assert routed["collectives"]["all-to-all"]["count"] == 5 and "all-gather" not in routed["collectives"]
    assert "| default | dense | weak | tables-routed | 4 |" in (tmp_path / "scaling.md").read_text()
    for row in saved:  # the kernels the step launches, and the compute or memory term's share of each
        h100 = row["step_seconds"]["h100"]
        assert row["kernels"] > 10
        assert h100["us_per_kernel"] == pytest.approx(1e6 * max(h100["compute"], h100["memory"]) / row["kernels"])


def test_lookups_compare_three_layouts(tmp_path):
    rows = bench_scaling.main(["--lookups", "4096", "--devices", "4", "--batch", "256", "--fields", "3",
                               "--out", str(tmp_path)])  # fmt: skip
    sent = {r["layout"]: r["collective_bytes_per_device"] for r in rows}
    assert set(sent) == {"replicated", "gspmd", "all-to-all"}
    assert sent["replicated"] > 3 * 4096 * 32 * 4  # the tables' dense gradients, all-reduced
    assert "| 4,096 | 4 |" in (tmp_path / "lookups.md").read_text()


def test_the_gpu_script_runs_its_parts_and_prints_one_table(tmp_path):
    """The parts that time steps are `train.bench`'s and `train.bench_text`'s (their own tests); here the script
    runs one part through and reports a failing one in its table."""
    lines = bench_gpu.main(["--quick", "--parts", "scaling", "host-join", "--out", str(tmp_path)])
    # the host join timed end to end (one row); default and STAR: 1 device, and all 8 (the test's virtual
    # devices) data-parallel and with routed tables
    assert [part for part, _, _ in lines] == ["host-join"] + ["scaling"] * 6
    assert sum("D=8" in line[1] for line in lines) == 4
    assert "text joined on the host" in lines[0][1] and "end to end" in lines[0][2]
    assert all(" kernels" in line[1] for line in lines[1:])  # XLA:GPU's count, where a GPU compiled it
    assert not [line for line in lines if line[1].startswith("failed")]
    assert "ex/s projected (H100)" in (tmp_path / "gpu.md").read_text()
    parts = bench_gpu.parts(tmp_path, quick=True, gpus=8)
    assert parts["scaling"][parts["scaling"].index("--devices") + 1 :][:2] == ["1", "8"]  # 1 GPU and all


def test_the_projection_takes_inter_node_links_at_a_share_of_line_rate_and_a_torus_all_to_all_at_its_bisection():
    from sr_jax.bench import roofline
    from sr_jax.bench.compiled import Collective

    h100, v5e, v5p = (roofline.ACCELERATORS[n] for n in ("h100", "tpu-v5e", "tpu-v5p"))
    across = Collective("all-to-all", 64, 10_000_000, "")  # 64 GPUs: 8 nodes
    at_line_rate = roofline.collective_seconds(h100, across, inter_node=1.0) - h100.slow_latency
    at_60 = roofline.collective_seconds(h100, across, inter_node=0.6) - h100.slow_latency
    assert at_60 == pytest.approx(at_line_rate / 0.6)
    inside = Collective("all-to-all", 8, 10_000_000, "")  # one NVLink island: the factor does not apply
    assert roofline.collective_seconds(h100, inside, 0.6) == roofline.collective_seconds(h100, inside, 1.0)
    assert roofline.torus_share(64, 2) == pytest.approx(0.25) and roofline.torus_share(64, 3) == pytest.approx(1 / 3)
    assert roofline.torus_share(4, 2) == 1.0  # a 2 x 2 torus: no worse than the chip's links
    reduce = Collective("all-reduce", 64, 10_000_000, "")  # a ring uses neighbours' links: no bisection share
    for tpu, share in ((v5e, 0.25), (v5p, 1 / 3)):
        plain = across.wire_bytes / tpu.link
        assert roofline.collective_seconds(tpu, across) - tpu.latency == pytest.approx(plain / share)
        assert roofline.collective_seconds(tpu, reduce) - tpu.latency == pytest.approx(reduce.wire_bytes / tpu.link)


def test_efficiency_is_also_reported_against_the_best_one_device_configuration(tmp_path):
    rows = bench_scaling.main(
        ["--devices", "1", "4", "--models", "default", "--modes", "weak", "--meshes", "data", "--updates", "dense",
         "rowwise_adagrad", "--batch", "512", "--texts", "100", *SMALL, "--out", str(tmp_path)]
    )  # fmt: skip
    ones = {r["update"]: r["projected_examples_per_s"]["h100"] for r in rows if r["devices"] == 1}
    best = max(ones.values())
    for r in rows:
        assert r["texts"] == 100 and r["inter_node_efficiency"] == 0.6
        expected = r["projected_examples_per_s"]["h100"] / (r["devices"] * best)
        assert r["efficiency_vs_best"]["h100"] == pytest.approx(expected)
        assert r["efficiency_vs_best"]["h100"] <= r["efficiency"]["h100"] + 1e-12
    assert "vs best" in (tmp_path / "scaling.md").read_text()


def test_drops_are_counted_by_running_the_routed_lookup(tmp_path):
    rows = bench_scaling.main(["--drops", "4096", "--devices", "4", "--batch", "256", "--out", str(tmp_path)])
    by = {(r["ids"], r["row_layout"]): r for r in rows}
    assert len(rows) == 6 and all(r["devices"] == 4 and 0 < r["unique_ids"] <= 1024 for r in rows)
    assert by[("new-rows-last", "contiguous")]["dropped"] > 0  # every id among the last shard's rows
    assert all(by[(ids, "strided")]["dropped"] == 0 for ids in ("uniform", "zipf", "new-rows-last"))
    assert "| new-rows-last | strided | 4 |" in (tmp_path / "drops.md").read_text()


def test_text_vectors_joined_on_the_host_leave_the_wire_for_the_host_link(tmp_path):
    """`data.text_join=host`: the routed step exchanges the id tables only (3 all-to-alls), sends fewer bytes a
    device, and takes each example's two text vectors in from its host instead; the projection counts that infeed
    as a floor under the step (it overlaps the step before)."""
    from sr_jax.bench import roofline

    args = ["--devices", "1", "4", "--models", "default", "--modes", "weak", "--meshes", "tables-routed",
            "--batch", "512", *SMALL]  # fmt: skip
    device = bench_scaling.main([*args, "--out", str(tmp_path / "device")])
    host = bench_scaling.main([*args, "--out", str(tmp_path / "host"), "data.text_join=host"])
    device, host = ({(r["devices"], r["mesh"]): r for r in rows} for rows in (device, host))
    routed, joined = device[(4, "tables-routed")], host[(4, "tables-routed")]
    assert joined["text_join"] == "host" and joined["collectives"]["all-to-all"]["count"] == 3
    assert joined["collective_bytes_per_device"] < routed["collective_bytes_per_device"]
    # two 16-d float32 vectors an example (query and item texts; no history in the bench world)
    extra = joined["infeed_bytes_per_device"] - routed["infeed_bytes_per_device"]
    assert extra == 512 * 2 * 16 * 4
    assert "each example's text vectors joined on the host" in (tmp_path / "host" / "scaling.md").read_text()
    h100 = roofline.ACCELERATORS["h100"]
    times = roofline.step_seconds(h100, 1e9, 1e6, [], infeed_bytes=64e9)  # a second of infeed: the floor
    assert times["infeed"] == pytest.approx(1.0) and times["step"] == pytest.approx(1.0)
    assert roofline.step_seconds(h100, 1e9, 1e6, [], infeed_bytes=0)["step"] == pytest.approx(1e9 / h100.peak_flops)
