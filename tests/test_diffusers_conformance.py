"""diffusers' generic model and pipeline checks, made for SDTTransformer2DModel and SDTPipeline.

diffusers runs ``ModelTesterMixin``, ``TrainingTesterMixin`` and ``MemoryTesterMixin`` (``tests/models/testing_utils``)
and ``PipelineTesterMixin`` (``tests/pipelines/test_pipelines_common.py``) against each of its models and pipelines,
DiT's included; they ship with diffusers' repository, not with its wheel. This module makes the same kinds of
checks, written for SDT: tiny models, CPU only, offline. Where a mixin check does not apply to SDT, a comment at
the end of its section says why. Checks that another test module already makes are named there, not repeated.
"""

from __future__ import annotations

import inspect
import os

import numpy as np
import pytest
import torch
from accelerate import cpu_offload
from accelerate.hooks import CpuOffload
from accelerate.utils import compute_module_sizes
from conftest import make_tiny_transformer, make_tiny_vae
from diffusers import AutoencoderTiny, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from diffusers.training_utils import EMAModel

from sdt_diffusion import SDTPipeline, SDTTransformer2DModel, default_scheduler

BATCH = 4
OUTPUT_SHAPE = (BATCH, 8, 8, 8)  # 4-channel 8x8 latents; learn_sigma doubles the channels (noise, variance)


# ============================================================================================= model


def build_model(**overrides) -> SDTTransformer2DModel:
    """The tiny SDT with adaLN-Zero un-zeroed (else the output is 0 and every comparison holds trivially)."""
    return make_tiny_transformer(**overrides)


def model_inputs(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The same inputs on every call (the mixins' contract)."""
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(BATCH, 4, 8, 8, generator=g).to(dtype),
        "timestep": torch.randint(0, 1000, (BATCH,), generator=g),
        "class_labels": torch.randint(0, 10, (BATCH,), generator=g),
    }


@pytest.fixture(scope="module")
def base_output() -> torch.Tensor:
    with torch.no_grad():
        return build_model()(**model_inputs(), return_dict=False)[0]


def forward(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(), return_dict=False)[0]


def test_model_output_shape_determinism_and_dict_tuple(base_output):
    model = build_model()
    assert base_output.shape == OUTPUT_SHAPE and base_output.abs().max() > 0
    torch.testing.assert_close(forward(model), forward(model), rtol=0, atol=0)
    with torch.no_grad():
        as_dict = model(**model_inputs())
    torch.testing.assert_close(as_dict.sample, base_output, rtol=0, atol=0)
    assert list(as_dict.keys()) == ["sample"]


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_model_save_load_round_trip(tmp_path, base_output, safe_serialization):
    model = build_model()
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    weights = "diffusion_pytorch_model." + ("safetensors" if safe_serialization else "bin")
    assert sorted(os.listdir(tmp_path)) == sorted(["config.json", weights])
    loaded = SDTTransformer2DModel.from_pretrained(tmp_path).eval()
    public = [{k: v for k, v in m.config.items() if not k.startswith("_")} for m in (model, loaded)]
    assert public[0] == public[1]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    torch.testing.assert_close(forward(loaded), base_output, rtol=0, atol=0)


def test_model_variant_round_trip(tmp_path, base_output):
    build_model().save_pretrained(tmp_path, variant="fp16")
    assert "diffusion_pytorch_model.fp16.safetensors" in os.listdir(tmp_path)
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model.bin"):
        SDTTransformer2DModel.from_pretrained(tmp_path)  # a variant is only found when asked for
    loaded = SDTTransformer2DModel.from_pretrained(tmp_path, variant="fp16").eval()
    torch.testing.assert_close(forward(loaded), base_output, rtol=0, atol=0)


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_model_sharded_checkpoint(tmp_path, base_output, variant):
    model = build_model()
    shard_kb = int(compute_module_sizes(model)[""] * 0.75 / 1024)
    model.save_pretrained(tmp_path, max_shard_size=f"{shard_kb}KB", variant=variant)
    index = "diffusion_pytorch_model.safetensors.index" + (f".{variant}" if variant else "") + ".json"
    assert index in os.listdir(tmp_path)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) >= 2
    loaded = SDTTransformer2DModel.from_pretrained(tmp_path, variant=variant).eval()
    torch.testing.assert_close(forward(loaded), base_output, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_model_from_pretrained_with_dtype(tmp_path, dtype):
    build_model().to(dtype).save_pretrained(tmp_path)
    for low_cpu_mem_usage in (True, False):
        loaded = SDTTransformer2DModel.from_pretrained(tmp_path, dtype=dtype, low_cpu_mem_usage=low_cpu_mem_usage)
        # SDT keeps no module in float32 on load (no `_keep_in_fp32_modules`): every weight takes the dtype
        assert loaded.dtype == dtype and all(p.dtype == dtype for p in loaded.parameters())


@pytest.mark.parametrize("overrides", [{"decay_mode": "fixed"}, {"use_abs_pos_embed": True}],
                         ids=["fixed-gamma-buffer", "abs-pos-embed-buffer"])
def test_model_non_persistent_buffers_rebuilt_on_load(tmp_path, overrides):
    # RMT's gamma and the sin-cos position embedding are rebuilt by __init__, not stored: loading on an empty
    # (meta) skeleton must still give them real values
    model = build_model(**overrides)
    model.save_pretrained(tmp_path)
    for low_cpu_mem_usage in (True, False):
        loaded = SDTTransformer2DModel.from_pretrained(tmp_path, low_cpu_mem_usage=low_cpu_mem_usage).eval()
        assert all(b.device.type == "cpu" for b in loaded.buffers())
        torch.testing.assert_close(forward(loaded), forward(model), rtol=0, atol=0)


def test_model_config_attributes_and_missing_attribute(recwarn):
    model = build_model()
    model.plain_attribute = 5
    assert model.plain_attribute == 5 and not recwarn.list
    model.register_to_config(test_attribute=5)
    with pytest.warns(FutureWarning):  # config values are read through model.config
        assert model.test_attribute == 5
    with pytest.raises(AttributeError) as err:
        model.does_not_exist  # noqa: B018
    assert str(err.value) == "'SDTTransformer2DModel' object has no attribute 'does_not_exist'"


# ----------------------------------------------------------------------------------------- training


def test_model_training_with_ema():
    model = build_model().train()
    ema = EMAModel(model.parameters(), decay=0.5)
    start = [p.detach().clone() for p in model.parameters()]
    out = model(**model_inputs(), return_dict=False)[0]
    torch.nn.functional.mse_loss(out, torch.randn(OUTPUT_SHAPE, generator=torch.Generator().manual_seed(1))).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    ema.step(model.parameters())
    averaged = build_model()
    ema.copy_to(averaged.parameters())
    for a, s, p in zip(averaged.parameters(), start, model.parameters()):  # EMA sits between start and now
        torch.testing.assert_close(a, s + (p.detach() - s) * (1 - ema.cur_decay_value))


def test_gradient_checkpointing_flags_and_where_applied():
    model = build_model()
    assert not model.is_gradient_checkpointing
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    # SDT checkpoints block by block from its own forward (as DiT does): the model is the one module with the flag
    assert {type(m).__name__ for m in model.modules() if hasattr(m, "gradient_checkpointing")} == {
        "SDTTransformer2DModel"}
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing


def test_gradient_checkpointing_equivalence_in_training_mode():
    # training mode keeps label dropout (class_dropout_prob=0.1) on: the same seed before each forward gives both
    # runs the same dropped labels, so the comparison covers dropout as well
    results = []
    for checkpointing in (False, True):
        model = build_model().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        torch.manual_seed(0)
        out = model(**model_inputs(), return_dict=False)[0]
        loss = (out - torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert (loss - loss_ckpt).abs() < 1e-5
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=5e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_mixed_precision_training_bfloat16_autocast():
    # the mixin runs this on accelerators only; CPU autocast supports bfloat16, so SDT is checked here too
    model = build_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**model_inputs(), return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out.float(), torch.zeros(OUTPUT_SHAPE))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("storage", [torch.float16, torch.float8_e4m3fn, torch.float8_e5m2],
                         ids=["fp16", "fp8_e4m3", "fp8_e5m2"])
def test_layerwise_casting_training(storage):
    # which modules stay in the compute dtype and the memory it saves: tests/test_model.py (test_layerwise_casting_*)
    model = build_model().train()
    model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
    out = model(**model_inputs(), return_dict=False)[0]
    torch.nn.functional.mse_loss(out, torch.zeros(OUTPUT_SHAPE)).backward()
    assert any(p.dtype == storage for p in model.parameters())
    assert all(p.grad is None or torch.isfinite(p.grad.float()).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------- memory


# Under offload hooks the attention calls its projections and LPE layer by layer (a hooked module's weights are
# only valid inside its own call) instead of the fused GEMM, so results agree to float32 rounding, not bitwise.
HOOKED_TOL = {"rtol": 1e-5, "atol": 1e-6}


def test_model_disk_offload_with_device_map(tmp_path, base_output):
    # the mixin's CPU/disk offload checks split the model between GPU 0 and the CPU; without a GPU the same
    # machinery (`_no_split_modules`, accelerate's device map and hooks) splits it between the CPU and the disk
    model = build_model()
    half = int(compute_module_sizes(model)[""] * 0.5)
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(ValueError, match="offload_folder"):
        SDTTransformer2DModel.from_pretrained(tmp_path / "bin", device_map="auto", max_memory={"cpu": half})
    model.save_pretrained(tmp_path / "st")
    for folder in ("bin", "st"):
        loaded = SDTTransformer2DModel.from_pretrained(tmp_path / folder, device_map="auto", max_memory={"cpu": half},
                                                       offload_folder=tmp_path / f"offload-{folder}")
        assert set(loaded.hf_device_map.values()) == {"cpu", "disk"}
        assert all(not k.startswith("blocks.0.") for k in loaded.hf_device_map)  # an SDTBlock is never split
        torch.testing.assert_close(forward(loaded), base_output, **HOOKED_TOL)


def test_model_sequential_offload_hooks(base_output):
    # accelerate's per-module offload (what a pipeline's enable_sequential_cpu_offload applies): weights live on
    # the meta device and each submodule fetches its own for its forward, so the forward may touch a weight only
    # through its module's call
    model = build_model()
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    torch.testing.assert_close(forward(model), base_output, **HOOKED_TOL)
    torch.testing.assert_close(forward(model), base_output, **HOOKED_TOL)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_model_group_offloading(base_output, offload_type):
    # the mixin onloads to an accelerator; onloading to the CPU runs the same grouping (blocks, then the rest)
    model = build_model()
    extra = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    model.enable_group_offload(torch.device("cpu"), offload_type=offload_type, **extra)
    torch.testing.assert_close(forward(model), base_output, **HOOKED_TOL)


# Model mixin checks that do not apply to SDT:
# - _keep_in_fp32_modules checks: SDT keeps none on load (see test_model_from_pretrained_with_dtype); its
#   precision-critical modules are named for layerwise casting instead (_skip_layerwise_casting_patterns).
# - from_save_pretrained_dtype_inference (fp16/bf16 forward after loading) needs an accelerator in the mixin;
#   tests/test_model.py::test_dtype_casting runs bf16 and fp16 forwards on the CPU.
# - layerwise_casting_memory: tests/test_model.py::test_layerwise_casting_footprint_follows_compute_dtype
#   (footprints; peak-memory figures need an accelerator's allocator statistics).
# - AttentionTesterMixin (processors, fused QKV, attention-backend dispatch): Spatial Decay Attention is not a
#   diffusers attention processor; its backends are switched by set_attention_backend and checked against the
#   float64 reference in tests/test_model.py and tests/test_fused_attention.py.
# - torch.compile: tests/test_model.py::test_torch_compile.
# - model parallelism, quantization, LoRA/PEFT, IP-adapter and caching mixins: SDT has no PEFT adapter mixin,
#   no quantizer config, no image-prompt inputs and no diffusers attention blocks to cache; multi-GPU needs GPUs.


# ============================================================================================= pipeline

PIPE_STEPS = 2


def pipeline_components(**transformer_overrides) -> dict:
    return {
        "transformer": make_tiny_transformer(**transformer_overrides),
        "vae": make_tiny_vae(),
        "scheduler": default_scheduler(),  # DiT's DDPM: its step draws noise through the generator too
    }


def make_pipeline(**components) -> SDTPipeline:
    pipe = SDTPipeline(**{**pipeline_components(), **components})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_inputs(seed: int = 0, **overrides) -> dict:
    return {"class_labels": [1], "generator": torch.Generator("cpu").manual_seed(seed),
            "num_inference_steps": PIPE_STEPS, "output_type": "np", **overrides}


def images(pipe: SDTPipeline, **overrides) -> np.ndarray:
    """The first output of a call with the dummy inputs (images, or latents for output_type="latent")."""
    return np.asarray(pipe(**pipeline_inputs(**overrides))[0])


@pytest.fixture(scope="module")
def reference_images() -> np.ndarray:
    return images(make_pipeline())


def test_pipeline_call_signature():
    params = inspect.signature(SDTPipeline.__call__).parameters
    assert "class_labels" in params
    optional = {"num_inference_steps", "generator", "latents", "output_type", "return_dict", "guidance_scale"}
    assert all(params[name].default is not inspect.Parameter.empty for name in optional)
    # DiTPipeline's call: no num_images_per_prompt (repeat a label for more images, see the batch checks), no
    # step callbacks (so the mixin's callback checks do not apply)
    assert not {"num_images_per_prompt", "callback_on_step_end", "callback"} & set(params)


def test_pipeline_components_property(reference_images):
    components = pipeline_components()
    pipe = make_pipeline(**components)
    assert set(pipe.components) == {"transformer", "vae", "scheduler"}
    assert all(pipe.components[k] is v for k, v in components.items())
    rebuilt = SDTPipeline(**pipe.components, id2label=pipe.id2label)  # id2label is config, not a component
    rebuilt.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(images(rebuilt), reference_images)


def test_pipeline_dict_tuple_outputs_and_call_with_defaults(reference_images):
    pipe = make_pipeline()
    as_tuple = pipe(**pipeline_inputs(), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    np.testing.assert_array_equal(as_tuple[0], reference_images)
    np.testing.assert_array_equal(pipe(**pipeline_inputs()).images, reference_images)
    assert len(pipe(class_labels=2, num_inference_steps=1).images) == 1  # everything else at its default


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_pipeline_save_load_local(tmp_path, reference_images, safe_serialization):
    make_pipeline().save_pretrained(tmp_path, safe_serialization=safe_serialization)
    loaded = SDTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(images(loaded), reference_images)


def test_pipeline_save_load_optional_components(tmp_path):
    # vae is optional (pixel-space models); a latent model without it can only return latents
    pipe = make_pipeline()
    pipe.vae = None
    latents = images(pipe, output_type="latent")
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    loaded = SDTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.vae is None
    np.testing.assert_array_equal(images(loaded, output_type="latent"), latents)


def test_pipeline_serialization_and_loading_with_variants(tmp_path):
    pipe = make_pipeline()
    pipe.save_pretrained(tmp_path / "variant", variant="fp16", safe_serialization=False)
    for name in ("transformer", "vae"):
        assert any(".fp16." in f for f in os.listdir(tmp_path / "variant" / name)), name
    loaded = SDTPipeline.from_pretrained(tmp_path / "variant", variant="fp16")
    for name in ("transformer", "vae"):
        for (key, a), b in zip(getattr(pipe, name).state_dict().items(), getattr(loaded, name).state_dict().values()):
            assert torch.equal(a, b), f"{name}.{key}"
    pipe.save_pretrained(tmp_path / "plain", safe_serialization=False)
    with pytest.raises(ValueError, match="You are trying to load the model files of the `variant=fp16`"):
        SDTPipeline.from_pretrained(tmp_path / "plain", variant="fp16")


def test_pipeline_from_pretrained_dtype_dict_alias_and_device_map(tmp_path, reference_images):
    make_pipeline().save_pretrained(tmp_path)
    mixed = SDTPipeline.from_pretrained(tmp_path, dtype={"transformer": torch.bfloat16, "default": torch.float16})
    assert mixed.transformer.dtype == torch.bfloat16 and mixed.vae.dtype == torch.float16
    half = SDTPipeline.from_pretrained(tmp_path, dtype=torch.float16)
    assert half.transformer.dtype == half.vae.dtype == torch.float16
    for pipe in (mixed, half):
        pipe.set_progress_bar_config(disable=True)
        out = images(pipe)
        assert out.dtype == np.float32 and np.isfinite(out).all()  # sampling state and images stay float32
    mapped = SDTPipeline.from_pretrained(tmp_path, device_map="cpu")
    mapped.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(images(mapped), reference_images)


def test_pipeline_to_dtype_and_device():
    pipe = make_pipeline()
    assert {c.dtype for c in pipe.components.values() if hasattr(c, "dtype")} == {torch.float32}
    pipe.to("cpu", dtype=torch.float16)
    assert {c.dtype for c in pipe.components.values() if hasattr(c, "dtype")} == {torch.float16}
    assert {c.device.type for c in pipe.components.values() if hasattr(c, "device")} == {"cpu"}
    assert np.isfinite(images(pipe)).all()


def test_pipeline_batch_consistent_and_single_identical(reference_images):
    # the mixins batch a call by repeating each batched argument: class_labels=[1] becomes [[1], [1], [1]]
    pipe = make_pipeline()
    batched = images(pipe, class_labels=3 * [[1]], generator=[torch.Generator().manual_seed(s) for s in range(3)])
    assert batched.shape == (3, 16, 16, 3)
    assert np.abs(batched[0] - reference_images[0]).max() < 1e-4  # the same seed alone or in a batch
    assert np.abs(batched[1] - batched[0]).max() > 1e-3


def test_pipeline_guidance_keeps_shapes(reference_images):
    pipe = make_pipeline()
    unguided = images(pipe, guidance_scale=1.0)
    guided = images(pipe, guidance_scale=7.5)
    assert guided.shape == unguided.shape == reference_images.shape
    assert np.abs(guided - unguided).max() > 1e-3


def test_pipeline_other_vae_class():
    # the latent mixin swaps in other VAE classes; AutoencoderTiny (TAESD-style) has a different config layout
    torch.manual_seed(0)
    tiny_vae = AutoencoderTiny(in_channels=3, out_channels=3, latent_channels=4, encoder_block_out_channels=(8, 8),
                               decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                               num_decoder_blocks=(1, 1))
    pipe = make_pipeline(vae=tiny_vae)
    assert images(pipe).shape == (1, 16, 16, 3)


def test_pipeline_model_cpu_offload_twice(reference_images):
    pipe = make_pipeline()
    for _ in range(2):  # enabling again re-installs the hooks
        pipe.enable_model_cpu_offload(device="cpu")
        np.testing.assert_allclose(images(pipe), reference_images, rtol=0, atol=1e-6)
        np.testing.assert_allclose(images(pipe), reference_images, rtol=0, atol=1e-6)  # hooks re-armed
        for name in ("transformer", "vae"):
            module = getattr(pipe, name)
            assert module.device.type == "cpu" and isinstance(module._hf_hook, CpuOffload), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="diffusers' sequential offload needs an accelerator to "
                    "execute on (with 'cpu' it fails inside accelerate, for DiTPipeline alike); the CPU check of "
                    "the same hooks is test_model_sequential_offload_hooks")
def test_pipeline_sequential_cpu_offload(reference_images):
    pipe = make_pipeline()
    pipe.enable_sequential_cpu_offload(device="cuda")
    assert {c.device.type for c in (pipe.transformer, pipe.vae)} == {"meta"}
    np.testing.assert_allclose(images(pipe), reference_images, rtol=0, atol=1e-3)


def test_pipeline_layerwise_casting_and_group_offloading_inference(reference_images):
    pipe = make_pipeline()
    pipe.to(dtype=torch.bfloat16)
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    out = images(pipe)
    assert out.shape == reference_images.shape and np.isfinite(out).all()
    grouped = make_pipeline()
    grouped.transformer.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    np.testing.assert_allclose(images(grouped), reference_images, rtol=0, atol=1e-6)


def test_pipeline_from_pipe():
    pipe = make_pipeline(id2label={i: f"thing {i}" for i in range(10)})
    same = SDTPipeline.from_pipe(pipe)
    assert same.transformer is pipe.transformer and same.vae is pipe.vae and same.id2label == pipe.id2label
    np.testing.assert_array_equal(images(same, class_labels=["thing 3"]), images(pipe, class_labels=[3]))
    # from DiT's pipeline: its VAE and scheduler are reused, the transformer is ours
    torch.manual_seed(0)
    dit = DiTPipeline(transformer=DiTTransformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
                                                        num_attention_heads=2, out_channels=8, num_embeds_ada_norm=10),
                      vae=make_tiny_vae(), scheduler=DDIMScheduler())
    ours = SDTPipeline.from_pipe(dit, transformer=make_tiny_transformer())
    ours.set_progress_bar_config(disable=True)
    assert ours.vae is dit.vae and ours.scheduler is dit.scheduler
    assert images(ours).shape == (1, 16, 16, 3)


# Pipeline mixin checks that do not apply, or are made elsewhere:
# - num_images_per_prompt, callback_on_step_end / callback_cfg, encode_prompt: not in DiTPipeline's call
#   either (class labels, no prompt); more images per class = the label repeated (batch checks above).
# - pt/np/pil output equivalence: tests/test_pipeline.py::test_output_types_shapes_and_ranges.
# - attention slicing, xformers, FreeU, fused QKV, the cache mixins: they act on diffusers attention processors or
#   UNet blocks, which SDT does not have.
# - float16 inference and save/load float16: accelerator-only in the mixin; bf16 sampling on the CPU is
#   tests/test_pipeline.py::test_bfloat16_transformer_runs, fp16 loading is checked above.
# - DiffusionPipeline.from_pretrained(folder): diffusers resolves `_class_name` inside diffusers itself, so a
#   third-party pipeline loads through its own class (SDTPipeline.from_pretrained), as checked above.
# - pipeline-level group offloading and device_map "balanced": accelerator-only.
