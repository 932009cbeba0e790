"""Every limit in one place: what a file, a form or an API call may ask of this program.

The first group bounds what any input may describe (a manifest, a schedule), so a hostile file is refused
before it allocates anything. The second bounds the work one request of the public app may cause; the app
checks them on the server for the UI and the API alike, and each refusal names its limit.
"""
from __future__ import annotations

# --- what a file may describe (library) -----------------------------------------------------------------------
MAX_MANIFEST_BYTES = 256 * 1024
MAX_NAME_CHARS = 512            # a teacher id, a path, a module name
MAX_PHASES = 8
MAX_STUDENT_STEPS = 64          # Euler steps of a few-step student, all phases together
MAX_LORA_RANK = 512             # published LoRAs of the 14B Wan experts are rank 64-256
MAX_TARGET_MODULES = 256
MAX_CFG = 20.0
MAX_STRENGTH = 2.0              # a LoRA's strength: per phase of a published student, or a teacher's style LoRA
MAX_TEACHER_LORAS = 4           # style LoRAs fused into one teacher
MAX_SIDE = 4096                 # pixels
MAX_FRAMES = 1024
MAX_IMAGE_PIXELS = 4096 * 4096  # a condition image, read from its header before any pixel is decoded
MAX_IMAGE_BYTES = 64 * 1024**2
MAX_CONDITION_IMAGES = 100_000  # a training run's condition images
MAX_PROBE_PER_PROMPT = 64       # images per eval prompt of a training run's probe (12 prompts)
MAX_REGRESSION_PAIRS = 1024     # teacher trajectories a run solves up front for its regression warm start
MIN_SHIFT, MAX_SHIFT = 1e-2, 1e2  # timestep shift: SD3 3, Wan 5-12; beyond this the grid collapses to 0 or 1
MAX_SCHEDULE_STEPS = 1000       # a teacher's own schedule

# --- what one request of the public app may cause (server) ---------------------------------------------------
MAX_TEACHER_STEPS = 200         # Compare's teacher side
MAX_PHASES_TAB_STEPS = 64       # the Phases tab's editor: a few-step schedule
MAX_DIVERSITY_SEEDS = 16
MAX_PROMPT_CHARS = 500
MAX_SEED = 2**31 - 1
MAX_UPLOAD_BYTES = 64 * 1024 * 1024      # a student folder (rank-64 LoRAs of the built-in teacher: a few MB)
MAX_PUBLISHED_BYTES = 2 * 1024**3        # a Wan2.2-Lightning rank-64 LoRA of a 14B network is ~0.6 GB
MAX_UPLOAD_FILES = 16
MAX_UPLOADED_STUDENTS = 50               # kept under runs/uploads; the oldest go first
STUDENT_CACHE_BYTES = 256 * 2**20        # loaded students kept in memory (LRU)
BUILTIN_TEACHER_COPIES = 4               # built-in teachers at other resolutions kept loaded (LRU)
MAX_QUEUE = 32                           # requests waiting per event before "busy"
# Sampling handlers at once per event (Compare and Showcase, student and teacher). They wait in ui/batching.py to
# share one network batch per model, which runs one at a time per lane (students, teachers): measured in
# docs/benchmarks.md, 20 visitors at once on 2 cores.
SAMPLE_SLOTS = 24
BATCH_IMAGES = 24                        # images in one network batch (several visitors' requests)
DOWNLOAD_MAX_AGE_S = 3600                # comparison PNGs, GIFs and zips are removed after this

# --- ZeroGPU: GPU time asked per sampling call (ui/gpu.py); estimates for a 14B video / 12B image network ------
GPU_BASE_S = 5                           # text encoding, VAE decode, moving tensors
GPU_IMAGE_STEP_S = 1.0                   # one transformer evaluation of an image teacher
GPU_VIDEO_STEP_S = 8.0                   # one of a video teacher (Wan 2.2 A14B, 480p, 81 frames)
GPU_MIN_S, GPU_MAX_S = 10, 300           # ZeroGPU grants at most a few minutes per call

# --- the showcase (pdmd/showcase.py, ui/showcase.py) ------------------------------------------------------------
SHOWCASE_STRENGTH_VARIANTS = 16          # published students at visitor-chosen strengths kept on disk (LRU)
