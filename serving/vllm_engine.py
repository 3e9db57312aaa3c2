"""The serving interface on vLLM's v1 ``AsyncLLM``: generation and pooling (embedding) engines.

Each engine is supervised (`serving.supervisor.Supervisor`): when its processes die it is
restarted in this process, and requests that arrive meanwhile wait a bounded time for it.

Seeded sampling on CPU: vLLM 0.32's model runner, after a step that computed only part of a
prompt (a chunked prefill), rewinds the random generator of each seeded request in that step
by its Philox offset (``generator.set_offset(generator.get_offset() - 4)`` in
``GPUModelRunner._bookkeeping_sync``). CPU generators (Mersenne Twister) have no offset and
raise ``RuntimeError: CPU Generator does not use offset``, which kills the engine core. On
CPU the engines therefore run without chunked prefill: every prompt is prefilled in one step
(``max_num_batched_tokens`` is at least the context length), no sample is ever discarded, and
a seeded request draws from its generator exactly once per output token, so the same seed
gives the same output whatever else is in the batch. GPUs keep chunked prefill.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from serving.catalog import CatalogError, ModelSpec
from serving.engine import (
    ChoiceDelta,
    EmbeddingBatch,
    EmbeddingEngine,
    EngineDead,
    EngineNotReady,
    EngineState,
    EngineStats,
    GenerationChunk,
    GenerationEngine,
    InvalidPrompt,
    ModelEngine,
    SamplingOptions,
    TokenLogprob,
    TopLogprob,
)
from serving.fairqueue import FairQueue, RequestContext
from serving.supervisor import Supervisor

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

__all__ = [
    "UnsafeEngineOptions",
    "VllmEmbeddingEngine",
    "VllmGenerationEngine",
    "configure_cpu_binding",
    "pin_engine_processes",
]


class UnsafeEngineOptions(ValueError):
    """The engine arguments would let ordinary requests crash the engine on this platform."""


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


def lora_enabled(spec: ModelSpec) -> bool:
    """Whether the model's engine runs with LoRA (it has adapters, or room for them)."""
    return spec.kind == "chat" and bool(spec.adapters or spec.engine.max_loras)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


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

    def __init__(
        self,
        spec: ModelSpec,
        engine_cpus: set[int] | None = None,
        *,
        ready_wait_s: float = 10.0,
        on_ready: Any = None,
    ) -> None:
        self.spec = spec
        self.engine_cpus = engine_cpus
        #: How long a request waits for an engine that is restarting.
        self.ready_wait_s = ready_wait_s
        self._stats = EngineStats()
        #: The admission queue in front of the engine (generation models).
        self.queue = FairQueue(slots=spec.engine.max_num_seqs or 256, max_queued=1024)
        self._llm: AsyncLLM | None = None
        self.supervisor = Supervisor(
            spec.name,
            launch=self._launch,
            stop=self._stop,
            dead=self._is_dead,
            on_ready=on_ready,
        )
        self._tokenizer: Any = None
        self._max_model_len = 0
        self._vocab_size = 0
        self._dimensions = 0
        self._fast: Any = None
        self._template: Any = None
        self._template_tokens: dict[str, Any] = {}
        #: Asleep (or waking) in vLLM's sleep mode; ``None`` when awake or not started.
        self._sleep_state: EngineState | None = None
        self._sleep_mode = False
        #: vLLM's adapter ids, one per adapter (name and weights) for the engine's life.
        self._lora_ids: dict[tuple[str, str], int] = {}

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
        if self._runner == "generate" and _on_cpu():
            # See the module docstring: chunked prefill plus a seed kills vLLM's CPU runner.
            if opts.extra.get("enable_chunked_prefill"):
                raise UnsafeEngineOptions(
                    f"model {self.spec.name!r}: enable_chunked_prefill cannot be on with "
                    "vLLM on CPU (a seeded request whose prompt is split across steps "
                    "crashes the engine)"
                )
            kwargs["enable_chunked_prefill"] = False
        if self._runner == "generate" and lora_enabled(self.spec):
            kwargs["enable_lora"] = True
            kwargs["max_loras"] = opts.max_loras or 4
            kwargs["max_lora_rank"] = opts.max_lora_rank
        if self.pool is not None and self.pool.can_sleep:
            kwargs["enable_sleep_mode"] = self._sleep_mode = True
        if self._runner == "generate":
            # Engine time per request (serving.metering); GPUs schedule asynchronously.
            sync = _on_cpu() or opts.extra.get("async_scheduling") is False
            kwargs["scheduler_cls"] = (
                "serving.metering.MeteredScheduler"
                if sync
                else "serving.metering.MeteredAsyncScheduler"
            )
        kwargs.update(opts.extra)
        return AsyncEngineArgs(**kwargs)

    def check_options(self) -> None:
        """Check the entry's engine arguments without starting anything.

        Raises:
            CatalogError: an argument vLLM does not know or refuses, or one unsafe here.
        """
        try:
            self._engine_args()
        except (TypeError, ValueError) as exc:
            raise CatalogError(f"model {self.name!r}: engine arguments: {exc}") from exc

    async def start(self) -> None:
        """Start the engine and supervise it from then on.

        Raises:
            UnsafeEngineOptions: the engine arguments are unsafe on this platform.
            Exception: whatever vLLM raised starting it.
        """
        await self.supervisor.start()

    async def _launch(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self._engine_args()
        self._stats.busy_ms = 0.0  # a new engine core counts from zero
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
        self._sleep_state = None
        if self._tokenizer is None:  # loaded before (load_tokenizer) or at an earlier start
            self._tokenizer = llm.get_tokenizer()
            self._prepare_tokenizer(self._tokenizer)
        # The engine's own figures win over what was read from the model's files.
        self._max_model_len = llm.model_config.max_model_len
        self._vocab_size = llm.model_config.get_vocab_size()
        if self._runner == "pooling":
            self._dimensions = int(llm.model_config.embedding_size)

    def load_tokenizer(self) -> None:
        if self._tokenizer is not None:
            return
        from transformers import AutoConfig
        from vllm.tokenizers.registry import get_tokenizer

        source = self.spec.resolved_source
        trust = bool(self.spec.engine.extra.get("trust_remote_code", False))
        tokenizer = get_tokenizer(source, runner_type=self._runner, trust_remote_code=trust)
        text = AutoConfig.from_pretrained(source, trust_remote_code=trust).get_text_config()
        self._vocab_size = int(text.vocab_size)
        longest = int(getattr(text, "max_position_embeddings", 0) or 0)
        self._max_model_len = self.spec.engine.max_model_len or longest
        if self._runner == "pooling":
            self._dimensions = int(getattr(text, "hidden_size", 0) or 0)
        self._prepare_tokenizer(tokenizer)
        self._tokenizer = tokenizer

    @property
    def state(self) -> EngineState:
        return self._sleep_state or self.supervisor.state

    @property
    def supervised(self) -> bool:
        return self.supervisor.watching

    @property
    def can_sleep(self) -> bool:
        return self._sleep_mode and self._sleep_state is None and self.supervisor.state == "ready"

    async def sleep(self) -> None:
        llm = self._llm
        if llm is None:
            raise EngineNotReady(f"The model `{self.name}` is not running.")
        self._sleep_state = EngineState.SLEEPING
        try:
            await llm.sleep(level=1)
        except BaseException:
            self._sleep_state = None
            raise

    async def wake(self) -> None:
        llm = self._llm
        if llm is None or self._sleep_state is None:
            return
        self._sleep_state = EngineState.WAKING
        try:
            await llm.wake_up()
        except BaseException:
            self._sleep_state = EngineState.SLEEPING
            raise
        self._sleep_state = None

    def memory_bytes(self) -> int | None:
        """The proportional memory (PSS) of the engine's processes, on a CPU host."""
        if not _on_cpu() or self._llm is None:
            return None
        import psutil

        manager = getattr(getattr(self._llm.engine_core, "resources", None), "engine_manager", None)
        total = 0
        for process in getattr(manager, "processes", None) or []:
            try:
                root = psutil.Process(process.pid)
                for proc in (root, *root.children(recursive=True)):
                    total += proc.memory_full_info().pss
            except psutil.Error:
                continue
        return total or None

    async def _stop(self) -> None:
        llm, self._llm = self._llm, None
        self._sleep_state = None
        if llm is not None:
            try:
                await asyncio.to_thread(llm.shutdown)
            except Exception:  # what is left of a dead engine may not shut down cleanly
                logger.warning("engine %s did not shut down cleanly", self.name, exc_info=True)

    def _is_dead(self) -> bool:
        llm = self._llm
        return llm is None or bool(llm.errored)

    async def shutdown(self) -> None:
        await self.supervisor.shutdown()

    def stats(self) -> EngineStats:
        supervisor = self.supervisor
        if supervisor.state == "ready" and self._is_dead():
            supervisor.notice_failure()
        stats = self._stats
        stats.state = self.state
        stats.ready = supervisor.state == "ready" and not self._is_dead()
        stats.restarts = supervisor.restarts
        stats.last_error = supervisor.last_error
        queue = getattr(self, "queue", None)
        if queue is not None:
            stats.admitted, stats.queued, stats.slots, stats.max_queued = (
                queue.running,
                queue.queued,
                queue.slots,
                queue.max_queued,
            )
        return stats

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def tokenize(self, text: str) -> list[int]:
        # Encoders are trained with their special tokens around every input ([CLS] ... [SEP]);
        # a chat prompt gets its special tokens from the template instead.
        special = self._runner == "pooling"
        if self._fast is not None:
            return list(self._fast.encode(text, add_special_tokens=special).ids)
        return list(self._require().encode(text, add_special_tokens=special))

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

    def _require(self) -> Any:
        """The tokenizer; it outlives restarts of the engine."""
        if self._tokenizer is None:
            self.supervisor.check()
            raise EngineNotReady(f"The model `{self.spec.name}` is not ready; please retry.")
        return self._tokenizer

    async def _engine(self) -> tuple[AsyncLLM, float]:
        """The running engine, brought onto the device by the pool when it is not there,
        waiting a bounded time for one that is restarting; and the milliseconds the
        request waited for its model to be brought in."""
        cold_ms = await self.pool.bring_in(self) if self.pool is not None else 0.0
        await self.supervisor.wait_ready(self.ready_wait_s)
        llm = self._llm
        if llm is None or llm.errored:
            self.supervisor.notice_failure()
            raise EngineDead(
                f"The model `{self.spec.name}` is restarting; please retry shortly.",
                retry_after_s=self.supervisor.retry_after_s(),
            )
        return llm, cold_ms

    def _died(self, exc: BaseException) -> EngineDead:
        self.supervisor.mark_error(exc)
        return EngineDead(
            f"The model `{self.spec.name}` stopped while serving the request; it is being "
            "restarted, please retry shortly.",
            retry_after_s=self.supervisor.retry_after_s(),
        )

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
        tokenizer = self._require()
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
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            if (value := getattr(options, name)) is not None:
                kwargs[name] = value
        if options.logit_bias:
            kwargs["logit_bias"] = options.logit_bias
        if options.response_format is not None:
            from vllm.sampling_params import StructuredOutputsParams

            form = options.response_format
            kwargs["structured_outputs"] = (
                StructuredOutputsParams(json_object=True)
                if form.kind == "json_object"
                else StructuredOutputsParams(json=form.schema)
            )
        try:
            return SamplingParams(**kwargs)
        except Exception as exc:
            if _is_client_error(exc):
                raise _invalid(exc) from exc
            raise

    def generate(
        self,
        prompt: list[int],
        options: SamplingOptions,
        request_id: str,
        *,
        stream: bool,
        context: RequestContext | None = None,
        adapter: str | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        # Checked here, before the first chunk is awaited, so a bad request fails before a
        # caller commits to a streamed answer.
        self.check_request(prompt, options, adapter)
        lora = self._lora(adapter) if adapter is not None else None
        copies = 1
        if options.n > 1 and options.temperature is not None and options.temperature < 1e-5:
            # Greedy choices are all the same, and vLLM refuses n > 1 for them: run one
            # sequence and hand it out n times (its tokens count once: the engine's work).
            copies, options = options.n, msgspec.structs.replace(options, n=1)
        params = self._sampling_params(options, stream=stream)
        return self._run(
            prompt,
            params,
            request_id,
            options.logprobs,
            copies,
            context or RequestContext(),
            lora,
        )

    def check_request(
        self, prompt: list[int], options: SamplingOptions, adapter: str | None
    ) -> None:
        """The prompt, the adapter and the sampling options' token ids, checked against the
        model before anything is queued or sent to a worker.

        Raises:
            InvalidPrompt: the request cannot run on this model.
        """
        self.check_prompt(prompt, options.max_tokens)
        if adapter is not None and (
            not lora_enabled(self.spec) or not any(a.name == adapter for a in self.spec.adapters)
        ):
            raise InvalidPrompt(
                f"the model `{self.name}` has no adapter `{adapter}`", param="model"
            )
        if options.logit_bias and max(options.logit_bias) >= self._vocab_size:
            raise InvalidPrompt(
                f"logit_bias token ids must lie in [0, {self._vocab_size}) for this model",
                param="logit_bias",
            )

    def _lora(self, adapter: str) -> Any:
        """vLLM's request for one of the model's adapters; the engine loads it on first use
        and keeps the most recently used ``max_loras`` on the device."""
        from vllm.lora.request import LoRARequest

        found = next((a for a in self.spec.adapters if a.name == adapter), None)
        if found is None or not lora_enabled(self.spec):
            raise InvalidPrompt(
                f"the model `{self.name}` has no adapter `{adapter}`", param="model"
            )
        key = (found.name, found.resolved_source)
        lora_id = self._lora_ids.get(key)
        if lora_id is None:  # a new adapter, or the same name on new weights: a new id
            lora_id = self._lora_ids[key] = len(self._lora_ids) + 1
        return LoRARequest(f"{self.name}:{found.name}", lora_id, found.resolved_source)

    async def _run(
        self,
        prompt: list[int],
        params: Any,
        request_id: str,
        logprobs: int | None,
        copies: int,
        context: RequestContext,
        lora: Any = None,
    ) -> AsyncIterator[GenerationChunk]:
        pool = self.pool
        if pool is not None:
            pool.enter(self)  # in flight from now on: the pool will not take the model out
        tokens = len(prompt)
        try:
            llm, cold_ms = await self._engine()
            queue_ms = await self.queue.acquire(context, len(prompt)) * 1000
            try:
                async with contextlib.aclosing(
                    self._stream(llm, prompt, params, request_id, logprobs, copies, context, lora)
                ) as chunks:
                    async for chunk in chunks:
                        chunk.queue_ms = queue_ms
                        chunk.cold_start_ms = cold_ms
                        tokens += sum(c.num_tokens for c in chunk.choices)
                        yield chunk
            finally:
                self.queue.release(context)
        finally:
            if pool is not None:
                pool.leave(self, tokens)

    async def _stream(
        self,
        llm: Any,
        prompt: list[int],
        params: Any,
        request_id: str,
        logprobs: int | None,
        copies: int,
        context: RequestContext,
        lora: Any = None,
    ) -> AsyncGenerator[GenerationChunk, None]:
        from vllm.inputs import TokensPrompt

        from serving.metering import BUSY_MS, ENGINE_MS

        tokens = TokensPrompt(prompt_token_ids=prompt)
        if context.cache_salt is not None:
            tokens["cache_salt"] = context.cache_salt
        results = llm.generate(tokens, params, request_id, lora_request=lora)
        stats = self._stats
        queue = self.queue
        engine_ms: float | None = None
        try:
            async for out in results:
                if metered := out.kv_transfer_params:
                    # Outputs merged on the way carry the latest step's figures; the largest.
                    if (spent := metered.get(ENGINE_MS)) is not None:
                        engine_ms = max(spent, engine_ms or 0.0)
                    stats.busy_ms = max(metered.get(BUSY_MS, 0.0), stats.busy_ms)
                choices = [_choice(c, logprobs) for c in out.outputs]
                if copies > 1:
                    choices += [
                        msgspec.structs.replace(choices[0], index=i, num_tokens=0)
                        for i in range(1, copies)
                    ]
                queue.charge(context, sum(c.num_tokens for c in choices))
                yield GenerationChunk(
                    choices=choices,
                    prompt_tokens=len(prompt),
                    cached_tokens=out.num_cached_tokens or 0,
                    finished=out.finished,
                    engine_ms=engine_ms,
                )
        except Exception as exc:
            if llm.errored:
                raise self._died(exc) from exc
            if _is_client_error(exc):  # vLLM's validation of the request
                raise _invalid(exc) from exc
            raise
        finally:
            stats.engine_ms_total += engine_ms or 0.0
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

    @property
    def dimensions(self) -> int:
        return self._dimensions

    async def embed(self, inputs: Sequence[list[int]], request_id: str) -> EmbeddingBatch:
        for ids in inputs:
            self.check_prompt(ids, 0)
        pool = self.pool
        if pool is None:
            return await self._embed(inputs, request_id)
        pool.enter(self)
        try:
            return await self._embed(inputs, request_id)
        finally:
            pool.leave(self, sum(len(ids) for ids in inputs))

    async def _embed(self, inputs: Sequence[list[int]], request_id: str) -> EmbeddingBatch:
        from vllm.inputs import TokensPrompt
        from vllm.pooling_params import PoolingParams

        llm, cold_ms = await self._engine()

        async def one(i: int, ids: list[int]) -> bytes:
            final = None
            results = llm.encode(
                TokensPrompt(prompt_token_ids=ids), PoolingParams(task="embed"), f"{request_id}-{i}"
            )
            try:
                async for out in results:
                    final = out
            except Exception as exc:
                if llm.errored:
                    raise self._died(exc) from exc
                if _is_client_error(exc):
                    raise _invalid(exc) from exc
                raise
            finally:
                await results.aclose()
            if final is None:
                raise self._died(RuntimeError("no embedding came back"))
            data = final.outputs.data
            return bytes(data.float().contiguous().numpy().astype("<f4").tobytes())

        # One task per input; if one fails the others are cancelled (aborted in the engine).
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(i, ids)) for i, ids in enumerate(inputs)]
        except ExceptionGroup as failed:
            raise _first_error(failed) from None
        vectors = [task.result() for task in tasks]
        return EmbeddingBatch(
            vectors=list(vectors),
            dimensions=len(vectors[0]) // 4 if vectors else 0,
            prompt_tokens=sum(len(ids) for ids in inputs),
            cold_start_ms=cold_ms,
        )


#: vLLM's names of request parameters, as the OpenAI API names them.
_PARAMS = {"structured_outputs": "response_format", "prompt_token_ids": "prompt"}


def _is_client_error(exc: BaseException) -> bool:
    """Whether vLLM refused the request itself (its fault is the caller's)."""
    from vllm.exceptions import VLLMClientError

    return isinstance(exc, VLLMClientError | ValueError)


def _invalid(exc: BaseException) -> InvalidPrompt:
    parameter = getattr(exc, "parameter", None)
    message = str(exc.args[0]) if exc.args else str(exc)
    return InvalidPrompt(message, param=_PARAMS.get(parameter, parameter) if parameter else None)


def _first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first leaf of an exception group (the failure that cancelled the rest)."""
    first: BaseException = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
