"""The serving interface on vLLM's v1 ``AsyncLLM``: generation and pooling (embedding) engines."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from serving.catalog import ModelSpec
from serving.engine import (
    ChoiceDelta,
    EmbeddingBatch,
    EmbeddingEngine,
    EngineDead,
    EngineNotReady,
    EngineStats,
    GenerationChunk,
    GenerationEngine,
    InvalidPrompt,
    ModelEngine,
    SamplingOptions,
    TokenLogprob,
    TopLogprob,
)

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

__all__ = [
    "VllmEmbeddingEngine",
    "VllmGenerationEngine",
    "configure_cpu_binding",
    "pin_engine_processes",
]

logger = logging.getLogger(__name__)
_GIB = 1 << 30


def configure_cpu_binding() -> set[int] | None:
    """On a CPU host, give the calling thread (the event loop) core 0, the engines the rest.

    vLLM's OpenMP threads are bound to the engine cores; the engine processes themselves move
    there once started (:func:`pin_engine_processes`), so their busy-waiting never competes
    with the event loop. Settings already in the environment win.

    Returns:
        The engine cores, or ``None`` where there is nothing to split (a GPU host, one core).
    """
    from vllm.platforms import current_platform

    cores = sorted(os.sched_getaffinity(0))
    if not current_platform.is_cpu() or len(cores) < 2:
        return None
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _core_list(cores[1:]))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    os.sched_setaffinity(0, {cores[0]})  # the calling thread runs the event loop
    return set(cores[1:])


def pin_engine_processes(cpus: set[int] | None) -> None:
    """Move every thread of every process this one started onto ``cpus``.

    Threads already bound inside ``cpus`` (vLLM's OpenMP threads, one per core) keep their
    binding; the rest (engine cores busy-polling their workers, helper threads) stop
    competing with the event loop.
    """
    if not cpus:
        return
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            threads = child.threads()
        except psutil.Error:
            continue
        for thread in threads:
            try:
                if not os.sched_getaffinity(thread.id) <= cpus:
                    os.sched_setaffinity(thread.id, cpus)
            except OSError:  # the thread ended meanwhile
                continue


def _core_list(cores: list[int]) -> str:
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])
    return ",".join(map(str, cores))


def _make_stat_logger(stats: EngineStats) -> Any:
    """A vLLM stat logger factory that copies the scheduler's figures into ``stats``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Recorder(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                stats.running = scheduler_stats.num_running_reqs
                stats.waiting = scheduler_stats.num_waiting_reqs
                stats.peak_running = max(stats.peak_running, stats.running)
                stats.kv_cache_usage = scheduler_stats.kv_cache_usage
                prefix = scheduler_stats.prefix_cache_stats
                stats.prefix_cache_queries += prefix.queries
                stats.prefix_cache_hits += prefix.hits
            if iteration_stats is not None:
                stats.requests_finished += len(iteration_stats.finished_requests)

        def log_engine_initialized(self) -> None:
            pass

    return _Recorder


class _VllmEngine(ModelEngine):
    _runner = "generate"

    def __init__(self, spec: ModelSpec, engine_cpus: set[int] | None = None) -> None:
        self.spec = spec
        self.engine_cpus = engine_cpus
        self._stats = EngineStats()
        self._llm: AsyncLLM | None = None
        self._tokenizer: Any = None
        self._max_model_len = 0
        self._vocab_size = 0
        self._fast: Any = None
        self._template: Any = None
        self._template_tokens: dict[str, Any] = {}

    def _engine_args(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        opts = self.spec.engine
        kwargs: dict[str, Any] = {
            "model": self.spec.resolved_source,
            "served_model_name": [self.spec.name],
            "runner": self._runner,
            "dtype": opts.dtype,
            "seed": opts.seed,
            "enable_prefix_caching": (
                opts.enable_prefix_caching
                if opts.enable_prefix_caching is not None
                else self._runner == "generate"
            ),
            "tensor_parallel_size": opts.tensor_parallel_size,
            "stream_interval": opts.stream_interval,
            "disable_log_stats": True,  # our recorder is the only stat logger
            "enable_log_requests": False,  # request logs would carry prompts
        }
        for key in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            if (value := getattr(opts, key)) is not None:
                kwargs[key] = value
        if opts.kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(opts.kv_cache_gb * _GIB)
        if opts.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = opts.gpu_memory_utilization
        kwargs.update(opts.extra)
        return AsyncEngineArgs(**kwargs)

    async def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self._engine_args()
        factory = _make_stat_logger(self._stats)
        all_cpus = os.sched_getaffinity(0) | (self.engine_cpus or set())

        def construct() -> AsyncLLM:
            # Processes inherit the affinity of the thread that starts them. Start-up is
            # CPU-bound work (imports, compilation) that may use every core; the engine
            # processes move to the engine cores once every engine is up
            # (see pin_engine_processes).
            previous = os.sched_getaffinity(0)
            os.sched_setaffinity(0, all_cpus)
            try:
                return AsyncLLM.from_engine_args(args, stat_loggers=[factory])
            finally:
                os.sched_setaffinity(0, previous)

        # The constructor blocks until the engine core process is up; run it in a thread
        # so several engines start side by side and the event loop stays responsive.
        llm = await asyncio.to_thread(construct)
        self._llm = llm
        self._tokenizer = llm.get_tokenizer()
        self._prepare_tokenizer(self._tokenizer)
        self._max_model_len = llm.model_config.max_model_len
        self._vocab_size = llm.model_config.get_vocab_size()
        self._stats.ready = True

    async def shutdown(self) -> None:
        self._stats.ready = False
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    def stats(self) -> EngineStats:
        if self._llm is not None and self._llm.errored:
            self._stats.ready = False
        return self._stats

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def tokenize(self, text: str) -> list[int]:
        # Encoders are trained with their special tokens around every input ([CLS] ... [SEP]);
        # a chat prompt gets its special tokens from the template instead.
        special = self._runner == "pooling"
        if self._fast is not None:
            return list(self._fast.encode(text, add_special_tokens=special).ids)
        return list(self._require()[1].encode(text, add_special_tokens=special))

    def _prepare_tokenizer(self, tokenizer: Any) -> None:
        """Keep private copies of the fast tokenizer and the compiled chat template.

        Both are what the public tokenizer calls use underneath, minus a layer of Python
        per call that the request path can do without.
        """
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            fast = Tokenizer.from_str(backend.to_str())
            # A tokenizer.json may carry padding and truncation meant for batch training;
            # the engine batches by itself, and over-long inputs are refused, not cut.
            fast.no_padding()
            fast.no_truncation()
            self._fast = fast
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, str):
            try:
                from transformers.utils.chat_template_utils import _compile_jinja_template

                self._template = _compile_jinja_template(template)
                self._template_tokens = dict(tokenizer.special_tokens_map)
            except Exception:  # an older or newer transformers: fall back to its public call
                logger.info("chat template of %s renders through transformers", self.name)
                self._template = None

    def _require(self) -> tuple[AsyncLLM, Any]:
        llm = self._llm
        if llm is None:
            raise EngineNotReady(f"model {self.spec.name!r} is not ready")
        if llm.errored:
            raise EngineDead(f"model {self.spec.name!r} engine has stopped")
        return llm, self._tokenizer

    def check_prompt(self, prompt: list[int], max_tokens: int) -> None:
        self._require()
        if not prompt:
            raise InvalidPrompt("the prompt is empty", param="messages")
        if min(prompt) < 0 or max(prompt) >= self._vocab_size:
            raise InvalidPrompt(
                f"token ids must lie in [0, {self._vocab_size}) for this model", param="prompt"
            )
        if len(prompt) + max_tokens > self._max_model_len:
            raise InvalidPrompt(
                f"this model's maximum context length is {self._max_model_len} tokens; "
                f"the request asks for {len(prompt)} prompt tokens and {max_tokens} output "
                "tokens",
                param="max_tokens" if max_tokens else "input",
                too_long=True,
            )


class VllmGenerationEngine(_VllmEngine, GenerationEngine):
    """A chat or completion model on ``AsyncLLM``."""

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        _, tokenizer = self._require()
        conversation = [{"role": role, "content": content} for role, content in messages]
        try:
            if self._template is not None:
                text = self._template.render(
                    messages=conversation,
                    tools=None,
                    documents=None,
                    add_generation_prompt=True,
                    **self._template_tokens,
                )
            else:
                text = tokenizer.apply_chat_template(
                    conversation, add_generation_prompt=True, tokenize=False
                )
        except Exception as exc:  # jinja errors from a model's template are the caller's input
            raise InvalidPrompt(f"the chat template rejected the messages: {exc}") from exc
        return self.tokenize(text)

    def _sampling_params(self, options: SamplingOptions, *, stream: bool) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kwargs: dict[str, Any] = {
            "n": options.n,
            "max_tokens": options.max_tokens,
            "stop": list(options.stop) or None,
            "seed": options.seed,
            "presence_penalty": options.presence_penalty,
            "frequency_penalty": options.frequency_penalty,
            "logprobs": options.logprobs,
            "ignore_eos": options.ignore_eos,
            "skip_special_tokens": True,
            "output_kind": RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        }
        if options.temperature is not None:
            kwargs["temperature"] = options.temperature
        if options.top_p is not None:
            kwargs["top_p"] = options.top_p
        try:
            return SamplingParams(**kwargs)
        except ValueError as exc:
            raise InvalidPrompt(str(exc)) from exc

    def generate(
        self,
        prompt: list[int],
        options: SamplingOptions,
        request_id: str,
        *,
        stream: bool,
    ) -> AsyncIterator[GenerationChunk]:
        # Checked here, before the first chunk is awaited, so a bad request fails before a
        # caller commits to a streamed answer.
        llm, _ = self._require()
        self.check_prompt(prompt, options.max_tokens)
        params = self._sampling_params(options, stream=stream)
        return self._run(llm, prompt, params, request_id, options.logprobs)

    async def _run(
        self, llm: AsyncLLM, prompt: list[int], params: Any, request_id: str, logprobs: int | None
    ) -> AsyncIterator[GenerationChunk]:
        from vllm.inputs import TokensPrompt

        results = llm.generate(TokensPrompt(prompt_token_ids=prompt), params, request_id)
        try:
            async for out in results:
                yield GenerationChunk(
                    choices=[_choice(c, logprobs) for c in out.outputs],
                    prompt_tokens=len(prompt),
                    cached_tokens=out.num_cached_tokens or 0,
                    finished=out.finished,
                )
        except ValueError as exc:  # vLLM's validation of the request
            raise InvalidPrompt(str(exc)) from exc
        except Exception as exc:
            if llm.errored:
                raise EngineDead(f"model {self.spec.name!r} engine has stopped") from exc
            raise
        finally:
            # Closing vLLM's generator aborts the request in the engine when it is unfinished.
            await results.aclose()


def _choice(output: Any, logprobs: int | None) -> ChoiceDelta:
    return ChoiceDelta(
        index=output.index,
        text=output.text,
        num_tokens=len(output.token_ids),
        finish_reason=output.finish_reason,
        stop_reason=output.stop_reason,
        logprobs=_logprobs(output, logprobs) if logprobs is not None else None,
    )


def _logprobs(output: Any, top: int) -> list[TokenLogprob]:
    entries = output.logprobs or []
    result = []
    for token_id, position in zip(output.token_ids, entries, strict=False):
        if position is None:
            continue
        chosen = position.get(token_id)
        ranked = sorted(position.items(), key=lambda kv: kv[1].rank or 0)[:top] if top else []
        result.append(
            TokenLogprob(
                token=(chosen.decoded_token if chosen else None) or "",
                logprob=float(chosen.logprob) if chosen else float("-inf"),
                top=[TopLogprob(lp.decoded_token or "", float(lp.logprob)) for _, lp in ranked],
            )
        )
    return result


class VllmEmbeddingEngine(_VllmEngine, EmbeddingEngine):
    """An embedding model on vLLM's pooling runner."""

    _runner = "pooling"

    async def embed(self, inputs: Sequence[list[int]], request_id: str) -> EmbeddingBatch:
        from vllm.inputs import TokensPrompt
        from vllm.pooling_params import PoolingParams

        llm, _ = self._require()
        for ids in inputs:
            self.check_prompt(ids, 0)

        async def one(i: int, ids: list[int]) -> bytes:
            final = None
            async for out in llm.encode(
                TokensPrompt(prompt_token_ids=ids), PoolingParams(task="embed"), f"{request_id}-{i}"
            ):
                final = out
            if final is None:
                raise EngineDead(f"model {self.spec.name!r} returned no embedding")
            data = final.outputs.data
            return bytes(data.float().contiguous().numpy().astype("<f4").tobytes())

        vectors = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(inputs)))
        return EmbeddingBatch(
            vectors=list(vectors),
            dimensions=len(vectors[0]) // 4 if vectors else 0,
            prompt_tokens=sum(len(ids) for ids in inputs),
        )
