/*
 * lastbit_run: run a lastbit bundle (kernels.so + plan.txt + params.bin) without the TVM
 * runtime.  Portable C99 + POSIX (dlopen, pthreads); builds for x86-64, aarch64 and armv7.
 *
 *   lastbit_run BUNDLE_DIR IO_DIR [--repeat N] [--threads N]
 *
 * Reads IO_DIR/input_<i>.bin (raw C-order bytes), runs every step of the plan once (or
 * 1 + N times with --repeat, printing the median), writes IO_DIR/output_<i>.bin.
 *
 * kernels.so is what TVM's LLVM backend emits for a set of PrimFuncs: one tvm-ffi packed
 * function per PrimFunc, exported as __tvm_ffi_<name>.  That code needs a handful of
 * runtime entry points; the runner provides them (exported with -rdynamic for the symbols
 * the library imports by name, and written into the library's "__<Name>" function-pointer
 * slots, which is how TVM's own loader wires a dynamic library up).
 *
 * The ABI structs live in lastbit_run.h, which the bundle builder checks against tvm_ffi's
 * headers for each target.
 *
 * Exit status: 0 ok, 2 bad command line or IO files, 3 bundle file missing or corrupt
 * (message names the file), 4 a kernel reported an error.
 */
#define _POSIX_C_SOURCE 200809L

#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "lastbit_run.h"

/* ------------------------------------------------------------------------------------ */
/* Errors */

#define LB_ALIGN 64
#define LB_ERR_MAX 2048

static __thread char lb_last_error[LB_ERR_MAX];

static void lb_die(int status, const char* fmt, ...) {
  va_list ap;
  fputs("lastbit_run: ", stderr);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  exit(status);
}

static void lb_set_error(const char* kind, const char** parts, int32_t num_parts) {
  size_t n = 0;
  int32_t i;
  lb_last_error[0] = '\0';
  if (kind) n += (size_t)snprintf(lb_last_error, LB_ERR_MAX, "%s: ", kind);
  for (i = 0; i < num_parts && n < LB_ERR_MAX - 1; ++i) {
    if (parts[i] == NULL) continue;
    n += (size_t)snprintf(lb_last_error + n, LB_ERR_MAX - n, "%s", parts[i]);
  }
}

/* ------------------------------------------------------------------------------------ */
/* Runtime entry points the generated code may call.  Exported by name (-rdynamic) and also
 * written into the library's "__<Name>" slots. */

void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t num_parts) {
  lb_set_error(kind, parts, num_parts);
}

void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message) {
  lb_set_error(kind, &message, 1);
}

int TVMFFIFunctionCall(void* func, LbAny* args, int32_t num_args, LbAny* result) {
  (void)func, (void)args, (void)num_args, (void)result;
  TVMFFIErrorSetRaisedFromCStr("RuntimeError", "lastbit_run cannot call packed functions from kernels");
  return -1;
}

int TVMFFIEnvModLookupFromImports(void* library_ctx, const char* func_name, void** out) {
  const char* parts[3] = {"kernel needs function '", func_name, "', which lastbit_run does not provide"};
  (void)library_ctx, (void)out;
  TVMFFIErrorSetRaisedFromCStrParts("RuntimeError", parts, 3);
  return -1;
}

int TVMFFIEnvModRegisterSystemLibSymbol(const char* name, void* symbol) {
  (void)name, (void)symbol; /* kernels are looked up with dlsym, never through a registry */
  return 0;
}

static pthread_mutex_t lb_init_once_mu = PTHREAD_MUTEX_INITIALIZER;

int TVMFFIHandleInitOnce(void** handle_addr, int (*init_func)(void** result)) {
  int rc = 0;
  pthread_mutex_lock(&lb_init_once_mu);
  if (*handle_addr == NULL) {
    void* result = NULL;
    rc = init_func(&result);
    if (rc == 0 && result == NULL) {
      TVMFFIErrorSetRaisedFromCStr("RuntimeError", "init_func must return a non-NULL handle");
      rc = -1;
    }
    if (rc == 0) *handle_addr = result;
  }
  pthread_mutex_unlock(&lb_init_once_mu);
  return rc;
}

void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint,
                               int dtype_bits_hint) {
  void* ptr = NULL;
  (void)device_id, (void)dtype_code_hint, (void)dtype_bits_hint;
  if (device_type != kLbDeviceCPU) {
    TVMFFIErrorSetRaisedFromCStr("RuntimeError", "workspace requested for a non-CPU device");
    return NULL;
  }
  if ((uint64_t)(size_t)nbytes != nbytes ||
      posix_memalign(&ptr, LB_ALIGN, nbytes ? (size_t)nbytes : 1) != 0) {
    TVMFFIErrorSetRaisedFromCStr("RuntimeError", "out of memory allocating a kernel workspace");
    return NULL;
  }
  return ptr;
}

int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr) {
  (void)device_type, (void)device_id;
  free(ptr);
  return 0;
}

/* Thread pool.  Workers persist between launches; a launch runs task 0 on the calling thread
 * and task i on worker i.  Tasks of one launch run concurrently, so the BSP barrier works.
 * A launch from inside a task (nested parallel loop) runs serially with num_task == 1, which
 * the generated lambdas handle (they split work by penv->num_task). */

typedef struct {
  LbParallelLambda flambda;
  void* cdata;
  LbParallelGroupEnv env;
} LbJob;

static struct {
  int num_threads; /* including the caller */
  int started;
  pthread_t* workers;
  pthread_mutex_t mu;
  pthread_cond_t start_cv, done_cv;
  unsigned long generation;
  int pending;
  int failed;
  char error[LB_ERR_MAX]; /* the first failing worker's message, for the caller's thread */
  LbJob job;
  pthread_barrier_t barrier;
} lb_pool;

static __thread int lb_in_task;

static void* lb_worker_main(void* arg) {
  int task_id = (int)(intptr_t)arg;
  unsigned long seen = 0;
  for (;;) {
    LbJob job;
    int rc;
    pthread_mutex_lock(&lb_pool.mu);
    while (lb_pool.generation == seen) pthread_cond_wait(&lb_pool.start_cv, &lb_pool.mu);
    seen = lb_pool.generation;
    job = lb_pool.job;
    pthread_mutex_unlock(&lb_pool.mu);
    if (task_id >= job.env.num_task) continue;
    lb_in_task = 1;
    rc = job.flambda(task_id, &lb_pool.job.env, job.cdata);
    lb_in_task = 0;
    pthread_mutex_lock(&lb_pool.mu);
    if (rc != 0 && !lb_pool.failed) {
      lb_pool.failed = 1;
      memcpy(lb_pool.error, lb_last_error, LB_ERR_MAX);
    }
    if (--lb_pool.pending == 0) pthread_cond_signal(&lb_pool.done_cv);
    pthread_mutex_unlock(&lb_pool.mu);
  }
  return NULL;
}

static void lb_pool_start(void) {
  int i;
  lb_pool.started = 1;
  pthread_mutex_init(&lb_pool.mu, NULL);
  pthread_cond_init(&lb_pool.start_cv, NULL);
  pthread_cond_init(&lb_pool.done_cv, NULL);
  if (lb_pool.num_threads <= 1) return;
  lb_pool.workers = (pthread_t*)calloc((size_t)lb_pool.num_threads, sizeof(pthread_t));
  for (i = 1; i < lb_pool.num_threads; ++i) {
    if (pthread_create(&lb_pool.workers[i], NULL, lb_worker_main, (void*)(intptr_t)i) != 0) {
      lb_pool.num_threads = i; /* run with the workers we got */
      break;
    }
    pthread_detach(lb_pool.workers[i]);
  }
}

int TVMBackendParallelLaunch(LbParallelLambda flambda, void* cdata, int num_task) {
  int rc, n;
  if (!lb_pool.started) lb_pool_start();
  n = lb_pool.num_threads;
  if (num_task > 0 && num_task < n) n = num_task;
  if (lb_in_task || n <= 1) {
    LbParallelGroupEnv env;
    env.sync_handle = NULL;
    env.num_task = 1;
    return flambda(0, &env, cdata);
  }
  pthread_barrier_init(&lb_pool.barrier, NULL, (unsigned)n);
  pthread_mutex_lock(&lb_pool.mu);
  lb_pool.job.flambda = flambda;
  lb_pool.job.cdata = cdata;
  lb_pool.job.env.sync_handle = &lb_pool.barrier;
  lb_pool.job.env.num_task = n;
  lb_pool.pending = n - 1;
  lb_pool.failed = 0;
  lb_pool.generation++;
  pthread_cond_broadcast(&lb_pool.start_cv);
  pthread_mutex_unlock(&lb_pool.mu);

  lb_in_task = 1;
  rc = flambda(0, &lb_pool.job.env, cdata);
  lb_in_task = 0;

  pthread_mutex_lock(&lb_pool.mu);
  while (lb_pool.pending > 0) pthread_cond_wait(&lb_pool.done_cv, &lb_pool.mu);
  if (lb_pool.failed) {
    if (rc == 0) memcpy(lb_last_error, lb_pool.error, LB_ERR_MAX);
    rc = -1;
  }
  pthread_mutex_unlock(&lb_pool.mu);
  pthread_barrier_destroy(&lb_pool.barrier);
  return rc;
}

int TVMBackendParallelBarrier(int task_id, LbParallelGroupEnv* penv) {
  (void)task_id;
  if (penv->num_task > 1 && penv->sync_handle != NULL) {
    pthread_barrier_wait((pthread_barrier_t*)penv->sync_handle);
  }
  return 0;
}

/* ------------------------------------------------------------------------------------ */
/* Bundle files */

static const char* lb_bundle_dir;
static char lb_path_buf[4096];

static const char* lb_path(const char* dir, const char* name) {
  snprintf(lb_path_buf, sizeof(lb_path_buf), "%s/%s", dir, name);
  return lb_path_buf;
}

static void* lb_aligned_alloc(size_t nbytes) {
  void* ptr = NULL;
  if (posix_memalign(&ptr, LB_ALIGN, nbytes ? nbytes : 1) != 0)
    lb_die(4, "out of memory (%lu bytes)", (unsigned long)nbytes);
  memset(ptr, 0, nbytes ? nbytes : 1);
  return ptr;
}

/* Read a whole file into a 64-byte aligned block; returns NULL (errno set) when unreadable. */
static void* lb_read_file(const char* path, size_t* out_size) {
  FILE* f = fopen(path, "rb");
  long size;
  void* data;
  if (f == NULL) return NULL;
  if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
    fclose(f);
    return NULL;
  }
  data = lb_aligned_alloc((size_t)size + 1);
  if (size > 0 && fread(data, 1, (size_t)size, f) != (size_t)size) {
    fclose(f);
    free(data);
    return NULL;
  }
  fclose(f);
  ((char*)data)[size] = '\0';
  *out_size = (size_t)size;
  return data;
}

/* ------------------------------------------------------------------------------------ */
/* Plan (see lastbit/codegen/bundle.py, Plan.to_text): whitespace-separated tokens.
 *
 *   lastbit-plan 1
 *   params_bytes N
 *   buffer ID KIND DTYPE CODE BITS LANES NDIM DIM... BASE PARAM_OFFSET
 *   function NAME
 *   step FUNC_INDEX NARGS BUFFER_ID...
 *   input BUFFER_ID
 *   output BUFFER_ID
 *   end
 */

enum { LB_INPUT, LB_CONST, LB_TEMP, LB_OUTPUT, LB_VIEW };

typedef struct {
  int kind;
  int base;            /* LB_VIEW: the buffer whose memory this one reshapes */
  long long param_offset; /* LB_CONST: byte offset in params.bin */
  size_t nbytes;
  LbTensor tensor;
} LbBuffer;

typedef struct {
  LbPackedFunc fn;
  int func_index;
  int num_args;
  LbAny* args;
} LbStep;

typedef struct {
  unsigned long long params_bytes;
  int num_buffers, num_functions, num_steps, num_inputs, num_outputs;
  LbBuffer* buffers;
  char** functions;
  LbStep* steps;
  int* inputs;
  int* outputs;
} LbPlan;

typedef struct {
  char* cur;
  const char* file;
} LbTokens;

static char* lb_next(LbTokens* t) {
  char* start;
  while (*t->cur == ' ' || *t->cur == '\n' || *t->cur == '\t' || *t->cur == '\r') t->cur++;
  if (*t->cur == '\0') lb_die(3, "bundle file '%s': truncated plan", t->file);
  start = t->cur;
  while (*t->cur && *t->cur != ' ' && *t->cur != '\n' && *t->cur != '\t' && *t->cur != '\r') t->cur++;
  if (*t->cur) *t->cur++ = '\0';
  return start;
}

static long long lb_next_int(LbTokens* t, long long lo, long long hi) {
  char* tok = lb_next(t);
  char* end;
  long long v;
  errno = 0;
  v = strtoll(tok, &end, 10);
  if (errno || *end != '\0' || v < lo || v > hi) lb_die(3, "bundle file '%s': bad number '%s'", t->file, tok);
  return v;
}

static int lb_kind(const char* s) {
  if (!strcmp(s, "input")) return LB_INPUT;
  if (!strcmp(s, "const")) return LB_CONST;
  if (!strcmp(s, "temp")) return LB_TEMP;
  if (!strcmp(s, "output")) return LB_OUTPUT;
  if (!strcmp(s, "view")) return LB_VIEW;
  return -1;
}

static void* lb_grow(void* ptr, int count, size_t elem) {
  /* arrays grow one element at a time; plans are small */
  void* p = realloc(ptr, (size_t)(count + 1) * elem);
  if (p == NULL) lb_die(4, "out of memory parsing the plan");
  memset((char*)p + (size_t)count * elem, 0, elem);
  return p;
}

static void lb_parse_plan(char* text, LbPlan* plan) {
  LbTokens t;
  char* tok;
  int i;
  const int64_t kMaxDim = (int64_t)1 << 40;
  t.cur = text;
  t.file = "plan.txt";
  memset(plan, 0, sizeof(*plan));
  if (strcmp(lb_next(&t), "lastbit-plan") != 0) lb_die(3, "bundle file 'plan.txt': not a lastbit plan");
  if (lb_next_int(&t, 0, 1000) != 1) lb_die(3, "bundle file 'plan.txt': unsupported plan version");
  for (;;) {
    tok = lb_next(&t);
    if (!strcmp(tok, "end")) break;
    if (!strcmp(tok, "params_bytes")) {
      plan->params_bytes = (unsigned long long)lb_next_int(&t, 0, (long long)1 << 48);
    } else if (!strcmp(tok, "buffer")) {
      LbBuffer* b;
      int ndim;
      uint64_t elems = 1;
      if (lb_next_int(&t, 0, 1 << 30) != plan->num_buffers)
        lb_die(3, "bundle file 'plan.txt': buffer ids out of order");
      plan->buffers = (LbBuffer*)lb_grow(plan->buffers, plan->num_buffers, sizeof(LbBuffer));
      b = &plan->buffers[plan->num_buffers];
      b->kind = lb_kind(lb_next(&t));
      if (b->kind < 0) lb_die(3, "bundle file 'plan.txt': unknown buffer kind");
      (void)lb_next(&t); /* dtype name, for people reading the plan */
      b->tensor.dtype.code = (uint8_t)lb_next_int(&t, 0, 255);
      b->tensor.dtype.bits = (uint8_t)lb_next_int(&t, 1, 255);
      b->tensor.dtype.lanes = (uint16_t)lb_next_int(&t, 1, 65535);
      ndim = (int)lb_next_int(&t, 0, 64);
      b->tensor.ndim = ndim;
      b->tensor.shape = (int64_t*)calloc((size_t)(ndim ? ndim : 1), sizeof(int64_t));
      for (i = 0; i < ndim; ++i) {
        b->tensor.shape[i] = (int64_t)lb_next_int(&t, 0, kMaxDim);
        elems *= (uint64_t)b->tensor.shape[i];
      }
      b->tensor.strides = NULL;
      b->tensor.byte_offset = 0;
      b->tensor.device.device_type = kLbDeviceCPU;
      b->tensor.device.device_id = 0;
      b->nbytes = (size_t)((elems * b->tensor.dtype.bits * b->tensor.dtype.lanes + 7) / 8);
      b->base = (int)lb_next_int(&t, -1, plan->num_buffers - 1);
      b->param_offset = lb_next_int(&t, -1, (long long)1 << 48);
      if (b->kind == LB_VIEW && (b->base < 0 || plan->buffers[b->base].nbytes != b->nbytes))
        lb_die(3, "bundle file 'plan.txt': view %d has a bad base", plan->num_buffers);
      if (b->kind == LB_CONST &&
          (b->param_offset < 0 || b->param_offset % LB_ALIGN != 0 ||
           (unsigned long long)b->param_offset + b->nbytes > plan->params_bytes))
        lb_die(3, "bundle file 'plan.txt': constant %d lies outside params.bin", plan->num_buffers);
      plan->num_buffers++;
    } else if (!strcmp(tok, "function")) {
      plan->functions = (char**)lb_grow(plan->functions, plan->num_functions, sizeof(char*));
      plan->functions[plan->num_functions++] = lb_next(&t);
    } else if (!strcmp(tok, "step")) {
      LbStep* s;
      plan->steps = (LbStep*)lb_grow(plan->steps, plan->num_steps, sizeof(LbStep));
      s = &plan->steps[plan->num_steps++];
      s->func_index = (int)lb_next_int(&t, 0, plan->num_functions - 1);
      s->num_args = (int)lb_next_int(&t, 0, 1 << 16);
      s->args = (LbAny*)calloc((size_t)(s->num_args ? s->num_args : 1), sizeof(LbAny));
      for (i = 0; i < s->num_args; ++i) {
        /* the buffer id for now: plan->buffers may still move while it grows */
        s->args[i].u.v_int64 = lb_next_int(&t, 0, plan->num_buffers - 1);
      }
    } else if (!strcmp(tok, "input")) {
      plan->inputs = (int*)lb_grow(plan->inputs, plan->num_inputs, sizeof(int));
      plan->inputs[plan->num_inputs++] = (int)lb_next_int(&t, 0, plan->num_buffers - 1);
    } else if (!strcmp(tok, "output")) {
      plan->outputs = (int*)lb_grow(plan->outputs, plan->num_outputs, sizeof(int));
      plan->outputs[plan->num_outputs++] = (int)lb_next_int(&t, 0, plan->num_buffers - 1);
    } else {
      lb_die(3, "bundle file 'plan.txt': unknown entry '%s'", tok);
    }
  }
  for (i = 0; i < plan->num_steps; ++i) {
    LbStep* s = &plan->steps[i];
    int k;
    for (k = 0; k < s->num_args; ++k) {
      LbBuffer* b = &plan->buffers[(int)s->args[k].u.v_int64];
      s->args[k].type_index = kLbAnyDLTensorPtr;
      s->args[k].zero_padding = 0;
      s->args[k].u.v_int64 = 0; /* clears the high word where pointers are 32-bit */
      s->args[k].u.v_ptr = &b->tensor;
    }
  }
}

/* ------------------------------------------------------------------------------------ */
/* Loading kernels.so */

typedef void (*LbAnyFn)(void);

/* The library holds each context function as a pointer variable named "__<Name>". */
static void lb_set_slot(void* lib, const char* name, LbAnyFn fn) {
  void* slot = dlsym(lib, name);
  if (slot != NULL) memcpy(slot, &fn, sizeof(fn));
}

/* dlopen of a truncated library dies of SIGBUS instead of failing, so check first that the
 * file is an ELF shared object for this machine's word size whose segments and section
 * table lie inside the file.  LB_ELF_END sets `end` to the last byte the headers point at. */
#define LB_ELF_END(Ehdr, Phdr)                                                          \
  do {                                                                                  \
    const Ehdr* eh = (const Ehdr*)data;                                                 \
    if (size < sizeof(Ehdr) || eh->e_type != ET_DYN) {                                  \
      problem = "not a shared library";                                                 \
      break;                                                                            \
    }                                                                                   \
    end = eh->e_phoff + (unsigned long long)eh->e_phnum * sizeof(Phdr);                 \
    if (end > size) break;                                                              \
    for (i = 0; i < eh->e_phnum; ++i) {                                                 \
      const Phdr* ph = (const Phdr*)(data + eh->e_phoff) + i;                           \
      if ((unsigned long long)ph->p_offset + ph->p_filesz > end) end = ph->p_offset + ph->p_filesz; \
    }                                                                                   \
    if (eh->e_shoff + (unsigned long long)eh->e_shnum * eh->e_shentsize > end)          \
      end = eh->e_shoff + (unsigned long long)eh->e_shnum * eh->e_shentsize;            \
  } while (0)

static const char* lb_check_elf(const char* path) {
  size_t size = 0, i;
  unsigned char* data = (unsigned char*)lb_read_file(path, &size);
  const char* problem = NULL;
  unsigned long long end = 0;
  if (data == NULL) return strerror(errno);
  if (size < EI_NIDENT || memcmp(data, ELFMAG, SELFMAG) != 0 ||
      (data[EI_CLASS] != ELFCLASS32 && data[EI_CLASS] != ELFCLASS64)) {
    problem = "not an ELF file";
  } else if (data[EI_CLASS] != (sizeof(void*) == 8 ? ELFCLASS64 : ELFCLASS32)) {
    problem = "built for another word size";
  } else if (sizeof(void*) == 8) {
    LB_ELF_END(Elf64_Ehdr, Elf64_Phdr);
  } else {
    LB_ELF_END(Elf32_Ehdr, Elf32_Phdr);
  }
  if (problem == NULL && end > size) problem = "truncated";
  free(data);
  return problem;
}

static void lb_load_kernels(LbPlan* plan) {
  static char lb_library_ctx; /* the generated code only needs a non-NULL handle */
  char symbol[512];
  LbPackedFunc* fns;
  void** ctx_slot;
  void* lib;
  int i;
  const char* problem = lb_check_elf(lb_path(lb_bundle_dir, "kernels.so"));
  if (problem != NULL) lb_die(3, "bundle file 'kernels.so': %s", problem);
  lib = dlopen(lb_path(lb_bundle_dir, "kernels.so"), RTLD_NOW | RTLD_LOCAL);
  if (lib == NULL) lb_die(3, "bundle file 'kernels.so': cannot load: %s", dlerror());
  if (dlsym(lib, "__tvm_ffi__library_bin") != NULL)
    lb_die(3, "bundle file 'kernels.so': embeds imported modules, which lastbit_run cannot load");
  ctx_slot = (void**)dlsym(lib, "__tvm_ffi__library_ctx");
  if (ctx_slot != NULL) *ctx_slot = &lb_library_ctx;
  lb_set_slot(lib, "__TVMFFIFunctionCall", (LbAnyFn)TVMFFIFunctionCall);
  lb_set_slot(lib, "__TVMFFIErrorSetRaisedFromCStr", (LbAnyFn)TVMFFIErrorSetRaisedFromCStr);
  lb_set_slot(lib, "__TVMFFIEnvModLookupFromImports", (LbAnyFn)TVMFFIEnvModLookupFromImports);
  lb_set_slot(lib, "__TVMFFIHandleInitOnce", (LbAnyFn)TVMFFIHandleInitOnce);
  lb_set_slot(lib, "__TVMBackendAllocWorkspace", (LbAnyFn)TVMBackendAllocWorkspace);
  lb_set_slot(lib, "__TVMBackendFreeWorkspace", (LbAnyFn)TVMBackendFreeWorkspace);
  lb_set_slot(lib, "__TVMBackendParallelLaunch", (LbAnyFn)TVMBackendParallelLaunch);
  lb_set_slot(lib, "__TVMBackendParallelBarrier", (LbAnyFn)TVMBackendParallelBarrier);

  fns = (LbPackedFunc*)calloc((size_t)(plan->num_functions ? plan->num_functions : 1), sizeof(LbPackedFunc));
  for (i = 0; i < plan->num_functions; ++i) {
    void* addr;
    snprintf(symbol, sizeof(symbol), "__tvm_ffi_%s", plan->functions[i]);
    addr = dlsym(lib, symbol);
    if (addr == NULL) lb_die(3, "bundle file 'kernels.so': no function '%s'", plan->functions[i]);
    /* POSIX guarantees data and function pointers convert through dlsym */
    memcpy(&fns[i], &addr, sizeof(addr));
  }
  for (i = 0; i < plan->num_steps; ++i) plan->steps[i].fn = fns[plan->steps[i].func_index];
  free(fns);
}

/* ------------------------------------------------------------------------------------ */

static void lb_bind_memory(LbPlan* plan, const char* io_dir) {
  size_t params_size = 0;
  char* params;
  int i;
  params = (char*)lb_read_file(lb_path(lb_bundle_dir, "params.bin"), &params_size);
  if (params == NULL) lb_die(3, "bundle file 'params.bin': cannot read: %s", strerror(errno));
  if ((unsigned long long)params_size != plan->params_bytes)
    lb_die(3, "bundle file 'params.bin': %lu bytes, the plan expects %llu", (unsigned long)params_size,
           plan->params_bytes);
  for (i = 0; i < plan->num_buffers; ++i) {
    LbBuffer* b = &plan->buffers[i];
    switch (b->kind) {
      case LB_CONST: b->tensor.data = params + b->param_offset; break;
      case LB_TEMP:
      case LB_OUTPUT: b->tensor.data = lb_aligned_alloc(b->nbytes); break;
      default: break;
    }
  }
  for (i = 0; i < plan->num_inputs; ++i) {
    char name[64];
    size_t size = 0;
    LbBuffer* b = &plan->buffers[plan->inputs[i]];
    snprintf(name, sizeof(name), "input_%d.bin", i);
    b->tensor.data = lb_read_file(lb_path(io_dir, name), &size);
    if (b->tensor.data == NULL) lb_die(2, "cannot read %s: %s", lb_path_buf, strerror(errno));
    if (size != b->nbytes)
      lb_die(2, "input %d has %lu bytes, expected %lu", i, (unsigned long)size, (unsigned long)b->nbytes);
  }
  /* views last: their base may be an input */
  for (i = 0; i < plan->num_buffers; ++i) {
    LbBuffer* b = &plan->buffers[i];
    if (b->kind == LB_VIEW) b->tensor.data = plan->buffers[b->base].tensor.data;
  }
}

static void lb_run_plan(const LbPlan* plan) {
  int i;
  for (i = 0; i < plan->num_steps; ++i) {
    const LbStep* s = &plan->steps[i];
    LbAny result;
    memset(&result, 0, sizeof(result));
    result.type_index = kLbAnyNone;
    lb_last_error[0] = '\0';
    if (s->fn(NULL, s->args, s->num_args, &result) != 0) {
      lb_die(4, "step %d (%s) failed: %s", i, plan->functions[s->func_index],
             lb_last_error[0] ? lb_last_error : "no error message");
    }
  }
}

static double lb_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static int lb_cmp_double(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

static void lb_write_outputs(const LbPlan* plan, const char* io_dir) {
  int i;
  for (i = 0; i < plan->num_outputs; ++i) {
    char name[64];
    const LbBuffer* b = &plan->buffers[plan->outputs[i]];
    FILE* f;
    snprintf(name, sizeof(name), "output_%d.bin", i);
    f = fopen(lb_path(io_dir, name), "wb");
    if (f == NULL || (b->nbytes && fwrite(b->tensor.data, 1, b->nbytes, f) != b->nbytes) || fclose(f) != 0)
      lb_die(2, "cannot write %s: %s", lb_path_buf, strerror(errno));
  }
}

static void lb_usage(void) {
  lb_die(2, "usage: lastbit_run BUNDLE_DIR IO_DIR [--repeat N] [--threads N]");
}

int main(int argc, char** argv) {
  LbPlan plan;
  size_t plan_size = 0;
  char* plan_text;
  const char* io_dir;
  int repeat = 0, threads = 0, i;
  const char* env_threads = getenv("LASTBIT_NUM_THREADS");

  if (argc < 3) lb_usage();
  lb_bundle_dir = argv[1];
  io_dir = argv[2];
  if (env_threads) threads = atoi(env_threads);
  for (i = 3; i < argc; ++i) {
    if (!strcmp(argv[i], "--repeat") && i + 1 < argc) {
      repeat = atoi(argv[++i]);
    } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
      threads = atoi(argv[++i]);
    } else {
      lb_usage();
    }
  }
  if (threads <= 0) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    threads = n > 0 ? (int)n : 1;
  }
  lb_pool.num_threads = threads > 256 ? 256 : threads;

  plan_text = (char*)lb_read_file(lb_path(lb_bundle_dir, "plan.txt"), &plan_size);
  if (plan_text == NULL) lb_die(3, "bundle file 'plan.txt': cannot read: %s", strerror(errno));
  lb_parse_plan(plan_text, &plan);
  lb_load_kernels(&plan);
  lb_bind_memory(&plan, io_dir);

  lb_run_plan(&plan);
  if (repeat > 0) {
    double* runs_ms = (double*)calloc((size_t)repeat, sizeof(double));
    for (i = 0; i < repeat; ++i) {
      double t0 = lb_now_ms();
      lb_run_plan(&plan);
      runs_ms[i] = lb_now_ms() - t0;
    }
    printf("runs_ms");
    for (i = 0; i < repeat; ++i) printf(" %.6f", runs_ms[i]);
    qsort(runs_ms, (size_t)repeat, sizeof(double), lb_cmp_double);
    printf("\nmedian_ms %.6f\nthreads %d\n", runs_ms[repeat / 2], lb_pool.num_threads);
    free(runs_ms);
  }
  lb_write_outputs(&plan, io_dir);
  return 0;
}
