"""The functions crystal-sglang wraps inside SGLang, each named by its exact target in `TARGETS`.

Always registered (cheap no-ops without eviction): the scheduler's construction, which installs the runtime
when the server was started with `--kv-evict` other than `none`, and the per-request parameter check.
Registered only then: the runtime's hooks, so that a server without eviction runs stock SGLang code.
"""

from __future__ import annotations

import dataclasses

import torch
from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from crystal_sglang.config import ConfigError
from crystal_sglang.patches import observability, server_flags
from crystal_sglang.patches.runtime import REQUEST_KEYS, EvictionRuntime, request_spec

_runtime: EvictionRuntime | None = None


def scheduler_constructed(_result, scheduler, *args, **kwargs) -> None:
    global _runtime
    spec = server_flags.spec_of(scheduler.server_args)
    if spec is None:
        return
    _runtime = EvictionRuntime(scheduler, spec)
    SchedulerOutputStreamer.has_additional_customized_info = True
    for target, (hook, kind) in RUNTIME_TARGETS.items():
        HookRegistry.register(target, hook, kind)
    HookRegistry.apply_hooks()


def runtime() -> EvictionRuntime | None:
    return _runtime


def check_request(_result, sampling_params, *args, **kwargs) -> None:
    """Refuse bad `custom_params` eviction overrides where SGLang checks sampling parameters (HTTP 400)."""
    params = sampling_params.custom_params
    if not isinstance(params, dict) or not any(str(key).startswith("kv_") for key in params):
        return
    spec = server_flags.current_spec()
    if spec is None:
        raise ValueError("custom_params kv_evict/kv_budget/kv_evict_config need a server started with "
                         "--kv-evict NAME (this one runs without eviction)")
    unknown = sorted(key for key in params if key.startswith("kv_") and key not in REQUEST_KEYS)
    if unknown:
        raise ValueError(f"unknown custom_params {', '.join(unknown)}; accepted: {', '.join(REQUEST_KEYS)}")
    try:
        request_spec(spec, params)
    except ConfigError as error:
        raise ValueError(f"custom_params: {error}") from None


def score_after_attention(original, layer, q, k, v, forward_batch, *args, **kwargs):
    if not forward_batch.forward_mode.is_decode():
        return original(layer, q, k, v, forward_batch, *args, **kwargs)
    _runtime.attending = layer.layer_id
    try:
        output = original(layer, q, k, v, forward_batch, *args, **kwargs)
    finally:
        _runtime.attending = None
    _runtime.record_layer(layer.layer_id, q, forward_batch, layer.k_scale_float)
    return output


def score_inside_torch_native_decode(original, backend, query, output, k_cache, v_cache, req_to_token,
                                     req_pool_indices, seq_lens, encoder_lens=None, scaling=None, enable_gqa=False,
                                     causal=False, is_cross_attn=False, sliding_window_size=None):  # fmt: skip
    """`torch_native` gathers each request's keys for its attention anyway: score them there (plain self-attention
    of a decode layer whose batch needs scores; any other call runs the backend's own loop)."""
    layer_id = _runtime.scores_in_attention()
    windowed = sliding_window_size is not None and sliding_window_size > -1
    plain = encoder_lens is None and not causal and not is_cross_attn and not windowed
    if layer_id is None or not plain:
        return original(backend, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                        encoder_lens, scaling=scaling, enable_gqa=enable_gqa, causal=causal,
                        is_cross_attn=is_cross_attn, sliding_window_size=sliding_window_size)  # fmt: skip
    return _runtime.attend_and_score(layer_id, query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                                     seq_lens, scaling, enable_gqa)  # fmt: skip


def start_decode_step(forward_batch, _cls, batch, *args, **kwargs):
    if forward_batch.forward_mode.is_decode():
        lengths = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens
        offsets = _runtime.begin_decode(batch.reqs, lengths.tolist())
        if offsets is not None:
            positions = forward_batch.positions
            forward_batch.positions = positions + torch.tensor(offsets, dtype=positions.dtype, device=positions.device)
    return forward_batch


def evict_after_step(_result, _scheduler, batch, *args, **kwargs) -> None:
    if batch.forward_mode.is_decode():
        _runtime.after_decode(batch)


def relieve_before_retracting(original, batch, *args, **kwargs):
    """`check_decode_mem` says whether the next step fits; when it does not, tighten budgets and ask again."""
    fits = original(batch, *args, **kwargs)
    if not fits:
        fits = _runtime.relieve_pressure(batch, lambda: original(batch, *args, **kwargs))
    return fits


def refuse_unservable(original, scheduler, req, *args, **kwargs):
    """A request whose eviction choice the served model cannot support (a check that needs the model, so it is made
    here, in the scheduler) is answered with HTTP 400 the way SGLang refuses its own: finished with an abort before
    it is queued."""
    retracted = kwargs.get("is_retracted", args[0] if args else False)
    if not retracted:
        message = _runtime.refusal(req)
        if message is not None:
            req.set_finish_with_abort(message)
    return original(scheduler, req, *args, **kwargs)


def forget_retracted(_result, req, *args, **kwargs) -> None:
    _runtime.forget(req)


def bounded_admission(original, adder, req, *args, total_tokens: int, **kwargs):
    """SGLang judges whether a newcomer fits by its prompt plus its remaining `max_new_tokens`; an evicting request
    can only grow to its budget, so both that check and the reservation it commits count it at its bound."""
    bound = _runtime.growth_bound(req)
    if bound is None:
        return original(adder, req, *args, total_tokens=total_tokens, **kwargs)
    from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS  # the scheduler's module, loaded by now

    reserved = min(max(req.sampling_params.max_new_tokens - len(req.output_ids), 0), CLIP_MAX_NEW_TOKENS)
    admission = original(adder, req, *args, total_tokens=total_tokens - max(0, reserved - bound), **kwargs)
    if not hasattr(admission, "max_new_tokens") or admission.max_new_tokens <= bound:
        return admission
    return dataclasses.replace(admission, max_new_tokens=bound)


def admit_bounded_by_budget(original, adder, req, *args, **kwargs):
    """SGLang admits `ignore_eos` requests by their full `max_new_tokens`; an evicting request's KV is bounded by
    its budget, so it takes the general admission path, where `bounded_admission` counts it at its bound."""
    params = req.sampling_params
    if not params.ignore_eos or _runtime.growth_bound(req) is None:
        return original(adder, req, *args, **kwargs)
    params.ignore_eos = False
    try:
        return original(adder, req, *args, **kwargs)
    finally:
        params.ignore_eos = True


def bounded_running_offset(original, adder, req, *args, **kwargs):
    reserved = original(adder, req, *args, **kwargs)
    bound = _runtime.growth_bound(req)
    return reserved if bound is None else min(reserved, bound)


def decode_log_with_savings(parts, _pool_stats, *args, **kwargs) -> list[str]:
    """SGLang's "Decode batch" line lists the pool's usage; add what eviction saved and what it retains."""
    return [*parts, observability.usage_message(_runtime.savings(), _runtime.clock.share_since_report())]


META_INFO_KEY = "kv_evict"


def eviction_meta_info(_streamer, reqs, *args, **kwargs) -> dict[str, list]:
    """Per emitted request: policy, budget, retained and evicted entries, evictions and the bytes of eviction state
    (`EvictionRuntime.request_info`). SGLang accumulates these lists over a request's emissions, so the response's
    `meta_info["kv_evict"][-1]` is the latest."""
    infos = [_runtime.request_info(req) for req in reqs]
    return {META_INFO_KEY: [[] if info is None else [info] for info in infos]}


def eviction_info_is_per_request(_streamer, key, *args, **kwargs) -> bool:
    return key == META_INFO_KEY


TARGETS = {
    "sglang.srt.managers.scheduler.Scheduler.__init__": (scheduler_constructed, HookType.AFTER),
    "sglang.srt.sampling.sampling_params.SamplingParams.verify": (check_request, HookType.AFTER),
}
_ADDER = "sglang.srt.managers.schedule_policy.PrefillAdder"
_STREAMER = "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer"
RUNTIME_TARGETS = {
    "sglang.srt.layers.radix_attention.RadixAttention.forward": (score_after_attention, HookType.AROUND),
    "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend._run_sdpa_forward_decode": (
        score_inside_torch_native_decode, HookType.AROUND),
    "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new": (start_decode_step, HookType.AFTER),
    "sglang.srt.managers.scheduler.Scheduler.process_batch_result": (evict_after_step, HookType.AFTER),
    "sglang.srt.managers.scheduler.Scheduler._add_request_to_queue": (refuse_unservable, HookType.AROUND),
    "sglang.srt.managers.schedule_batch.Req.reset_for_retract": (forget_retracted, HookType.AFTER),
    "sglang.srt.managers.schedule_batch.ScheduleBatch.check_decode_mem": (relieve_before_retracting, HookType.AROUND),
    f"{_ADDER}.add_one_req": (admit_bounded_by_budget, HookType.AROUND),
    f"{_ADDER}._select_prefill_admission": (bounded_admission, HookType.AROUND),
    f"{_ADDER}._get_running_request_total_token_offset": (bounded_running_offset, HookType.AROUND),
    f"{_STREAMER}.build_additional_customized_info": (eviction_meta_info, HookType.REPLACE),
    f"{_STREAMER}.is_request_level_customized_info_key": (eviction_info_is_per_request, HookType.REPLACE),
    "sglang.srt.managers.scheduler_components.pool_stats_observer.PoolStats.get_decode_usage_msg_parts": (
        decode_log_with_savings, HookType.AFTER),
}
