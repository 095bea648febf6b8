/* A stand-in for the CUDA driver library (libcuda.so.1) for machines without a GPU.
 *
 * cuda-bindings loads libcuda.so.1 by name and fetches every function through
 * cuGetProcAddress_v2, so a library with that soname, loaded first, receives the real
 * package's calls with the argument structs exactly as the package lays them out in
 * memory. This one implements the checkpoint API's state machine per pid and what its
 * documentation demands of a restore's GPU pairs (every checkpointed GPU named once,
 * distinct targets that exist), and records each call as one JSON line that the tests
 * read back with fake_cuda_log().
 *
 * The layouts follow cuda.h: CUuuid is 16 bytes; CUcheckpointGpuPair is {old, new};
 * CUcheckpointRestoreArgs and CUcheckpointLockArgs are 64 bytes, the pair pointer and
 * its count (or the timeout) first and every other byte reserved, to be zero.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef struct { unsigned char bytes[16]; } CUuuid;
typedef struct { CUuuid oldUuid; CUuuid newUuid; } CUcheckpointGpuPair;

enum {
    SUCCESS = 0, INVALID_VALUE = 1, NOT_INITIALIZED = 3, NO_DEVICE = 100,
    INVALID_DEVICE = 101, ILLEGAL_STATE = 401, NOT_FOUND = 500, TIMEOUT = 909,
};
enum { RUNNING = 0, LOCKED = 1, CHECKPOINTED = 2, FAILED = 3 };

#define MAX_PROCS 64
#define MAX_GPUS 8
#define LOG_SIZE (1 << 16)

static struct {
    int pid, state, gpu_count;
    CUuuid gpus[MAX_GPUS]; /* the GPUs the process's checkpoint covers */
} procs[MAX_PROCS];
static int proc_count;
static CUuuid devices[MAX_GPUS];
static int device_count = 1;
static int driver_version = 13000;
static int initialised;
static char fail_name[64];
static CUresult fail_code;
static char log_text[LOG_SIZE];
static size_t log_used;

static void log_line(const char *line) {
    size_t n = strlen(line);
    if (log_used + n + 2 < LOG_SIZE) {
        memcpy(log_text + log_used, line, n);
        log_used += n;
        log_text[log_used++] = '\n';
        log_text[log_used] = 0;
    }
}

static void hex(const unsigned char *raw, size_t n, char *out) {
    for (size_t i = 0; i < n; i++) sprintf(out + 2 * i, "%02x", raw[i]);
}

static int all_zero(const unsigned char *raw, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (raw[i]) return 0;
    return 1;
}

/* The injected failure for `name`, once; SUCCESS when none. */
static CUresult injected(const char *name) {
    if (fail_name[0] && strcmp(fail_name, name) == 0) {
        fail_name[0] = 0;
        return fail_code;
    }
    return SUCCESS;
}

static int find_proc(int pid) {
    for (int i = 0; i < proc_count; i++)
        if (procs[i].pid == pid) return i;
    return -1;
}

static int find_device(const CUuuid *uuid) {
    for (int i = 0; i < device_count; i++)
        if (memcmp(devices[i].bytes, uuid->bytes, 16) == 0) return i;
    return -1;
}

/* -- control, called by the tests through ctypes ------------------------------------ */

void fake_cuda_reset(int version, int count, const unsigned char *uuids) {
    proc_count = 0;
    log_used = 0;
    log_text[0] = 0;
    fail_name[0] = 0;
    driver_version = version;
    device_count = count > MAX_GPUS ? MAX_GPUS : count;
    for (int i = 0; i < device_count; i++) memcpy(devices[i].bytes, uuids + 16 * i, 16);
}

/* A CUDA process in `state` whose checkpoint covers `count` GPUs (UUIDs, 16 bytes each). */
void fake_cuda_add_process(int pid, int state, int count, const unsigned char *uuids) {
    int i = find_proc(pid);
    if (i < 0) {
        if (proc_count == MAX_PROCS) return;
        i = proc_count++;
    }
    procs[i].pid = pid;
    procs[i].state = state;
    procs[i].gpu_count = count > MAX_GPUS ? MAX_GPUS : count;
    for (int g = 0; g < procs[i].gpu_count; g++) memcpy(procs[i].gpus[g].bytes, uuids + 16 * g, 16);
}

/* The GPUs process `pid` holds now, 16 bytes each; returns how many (-1: unknown pid). */
int fake_cuda_process_gpus(int pid, unsigned char *out) {
    int i = find_proc(pid);
    if (i < 0) return -1;
    for (int g = 0; g < procs[i].gpu_count; g++) memcpy(out + 16 * g, procs[i].gpus[g].bytes, 16);
    return procs[i].gpu_count;
}

void fake_cuda_fail_next(const char *name, CUresult code) {
    snprintf(fail_name, sizeof fail_name, "%s", name);
    fail_code = code;
}

const char *fake_cuda_log(void) { return log_text; }

/* -- the driver API ------------------------------------------------------------------- */

CUresult cuInit(unsigned int flags) {
    char line[64];
    CUresult err = injected("cuInit");
    snprintf(line, sizeof line, "{\"call\": \"cuInit\", \"flags\": %u, \"result\": %d}", flags, err);
    log_line(line);
    if (err == SUCCESS) initialised = 1;
    return err;
}

CUresult cuDriverGetVersion(int *version) {
    if (!version) return INVALID_VALUE;
    *version = driver_version;
    return SUCCESS;
}

static const struct { CUresult code; const char *name, *text; } errors[] = {
    {SUCCESS, "CUDA_SUCCESS", "no error"},
    {INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE", "the operation is not permitted in this state"},
    {NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {TIMEOUT, "CUDA_ERROR_TIMEOUT", "the operation timed out"},
};

static int error_index(CUresult code) {
    for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++)
        if (errors[i].code == code) return (int)i;
    return -1;
}

CUresult cuGetErrorName(CUresult code, const char **name) {
    int i = error_index(code);
    if (!name || i < 0) return INVALID_VALUE;
    *name = errors[i].name;
    return SUCCESS;
}

CUresult cuGetErrorString(CUresult code, const char **text) {
    int i = error_index(code);
    if (!text || i < 0) return INVALID_VALUE;
    *text = errors[i].text;
    return SUCCESS;
}

CUresult cuDeviceGetCount(int *count) {
    if (!initialised) return NOT_INITIALIZED;
    *count = device_count;
    return SUCCESS;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    if (!initialised) return NOT_INITIALIZED;
    if (ordinal < 0 || ordinal >= device_count) return INVALID_DEVICE;
    *device = ordinal;
    return SUCCESS;
}

CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice device) {
    if (!initialised) return NOT_INITIALIZED;
    if (device < 0 || device >= device_count) return INVALID_DEVICE;
    *uuid = devices[device];
    return SUCCESS;
}

CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice device) { return cuDeviceGetUuid(uuid, device); }

static CUresult checked(const char *name, int pid, int *index) {
    if (!initialised) return NOT_INITIALIZED;
    CUresult err = injected(name);
    if (err != SUCCESS) return err;
    *index = find_proc(pid);
    return *index < 0 ? NOT_FOUND : SUCCESS;
}

static void log_call(const char *name, int pid, const void *args, CUresult err, const char *extra) {
    char line[2048];
    snprintf(line, sizeof line,
             "{\"call\": \"%s\", \"pid\": %d, \"args_null\": %s, \"result\": %d%s}", name, pid,
             args ? "false" : "true", err, extra ? extra : "");
    log_line(line);
}

CUresult cuCheckpointProcessGetState(int pid, int *state) {
    int i;
    CUresult err = checked("cuCheckpointProcessGetState", pid, &i);
    if (err == SUCCESS) {
        if (!state) err = INVALID_VALUE;
        else *state = procs[i].state;
    }
    log_call("cuCheckpointProcessGetState", pid, state, err, NULL);
    return err;
}

static CUresult move(const char *name, int pid, const void *args, int from, int to) {
    int i;
    CUresult err = checked(name, pid, &i);
    if (err == SUCCESS) err = procs[i].state == from ? SUCCESS : ILLEGAL_STATE;
    if (err == SUCCESS) procs[i].state = to;
    log_call(name, pid, args, err, NULL);
    return err;
}

CUresult cuCheckpointProcessLock(int pid, const unsigned char *args) {
    int i;
    char extra[64] = "";
    CUresult err = checked("cuCheckpointProcessLock", pid, &i);
    if (args) {
        unsigned int timeout;
        memcpy(&timeout, args, sizeof timeout);
        snprintf(extra, sizeof extra, ", \"timeout_ms\": %u", timeout);
        if (err == SUCCESS && !all_zero(args + 4, 60)) err = INVALID_VALUE;
    }
    if (err == SUCCESS) err = procs[i].state == RUNNING ? SUCCESS : ILLEGAL_STATE;
    if (err == SUCCESS) procs[i].state = LOCKED;
    log_call("cuCheckpointProcessLock", pid, args, err, extra);
    return err;
}

CUresult cuCheckpointProcessCheckpoint(int pid, const void *args) {
    return move("cuCheckpointProcessCheckpoint", pid, args, LOCKED, CHECKPOINTED);
}

CUresult cuCheckpointProcessUnlock(int pid, const void *args) {
    return move("cuCheckpointProcessUnlock", pid, args, LOCKED, RUNNING);
}

/* Where each checkpointed GPU goes; INVALID_VALUE unless the pairs name every
   checkpointed GPU exactly once and send them to distinct GPUs present here. */
static CUresult placement(int i, const CUcheckpointGpuPair *pairs, unsigned int count,
                          CUuuid *target) {
    if (count != (unsigned int)procs[i].gpu_count) return INVALID_VALUE;
    for (int g = 0; g < procs[i].gpu_count; g++) {
        int found = -1;
        for (unsigned int p = 0; p < count; p++)
            if (memcmp(pairs[p].oldUuid.bytes, procs[i].gpus[g].bytes, 16) == 0) found = (int)p;
        if (found < 0 || find_device(&pairs[found].newUuid) < 0) return INVALID_VALUE;
        target[g] = pairs[found].newUuid;
        for (int h = 0; h < g; h++)
            if (memcmp(target[h].bytes, target[g].bytes, 16) == 0) return INVALID_VALUE;
    }
    return SUCCESS;
}

CUresult cuCheckpointProcessRestore(int pid, const unsigned char *args) {
    int i;
    char extra[1024] = "";
    CUresult err = checked("cuCheckpointProcessRestore", pid, &i);
    const CUcheckpointGpuPair *pairs = NULL;
    unsigned int count = 0;
    if (args) {
        memcpy(&pairs, args, sizeof pairs);
        memcpy(&count, args + sizeof pairs, sizeof count);
        size_t used = (size_t)snprintf(extra, sizeof extra, ", \"pairs\": [");
        for (unsigned int p = 0; pairs && p < count && p < MAX_GPUS; p++) {
            char old_hex[33], new_hex[33];
            hex(pairs[p].oldUuid.bytes, 16, old_hex);
            hex(pairs[p].newUuid.bytes, 16, new_hex);
            used += (size_t)snprintf(extra + used, sizeof extra - used, "%s[\"%s\", \"%s\"]",
                                     p ? ", " : "", old_hex, new_hex);
        }
        snprintf(extra + used, sizeof extra - used, "], \"count\": %u, \"reserved_zero\": %s",
                 count, all_zero(args + 12, 52) ? "true" : "false");
        if (err == SUCCESS && (!all_zero(args + 12, 52) || (count && !pairs))) err = INVALID_VALUE;
    }
    if (err == SUCCESS && procs[i].state != CHECKPOINTED) err = ILLEGAL_STATE;
    CUuuid target[MAX_GPUS];
    if (err == SUCCESS && count) err = placement(i, pairs, count, target);
    if (err == SUCCESS && !count)
        for (int g = 0; g < procs[i].gpu_count; g++) {
            /* No pairs: every GPU must be here under its own UUID. */
            if (find_device(&procs[i].gpus[g]) < 0) err = INVALID_DEVICE;
            target[g] = procs[i].gpus[g];
        }
    if (err == SUCCESS) {
        procs[i].state = LOCKED;
        memcpy(procs[i].gpus, target, sizeof(CUuuid) * (size_t)procs[i].gpu_count);
    }
    log_call("cuCheckpointProcessRestore", pid, args, err, extra);
    return err;
}

CUresult cuCheckpointProcessGetRestoreThreadId(int pid, int *tid) {
    int i;
    CUresult err = checked("cuCheckpointProcessGetRestoreThreadId", pid, &i);
    if (err == SUCCESS) {
        if (!tid) err = INVALID_VALUE;
        else *tid = pid + 1;
    }
    log_call("cuCheckpointProcessGetRestoreThreadId", pid, tid, err, NULL);
    return err;
}

/* -- contexts and memory, enough for bench/gpu_workload.py: "device" memory is host
   memory here, so a test can read and change it through /proc/PID/mem. ------------- */

static int primary_context = 1;

CUresult cuDeviceGetName(char *name, int length, CUdevice device) {
    if (!initialised) return NOT_INITIALIZED;
    if (device < 0 || device >= device_count || length <= 0) return INVALID_VALUE;
    snprintf(name, (size_t)length, "Fake GPU %d", device);
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(void **context, CUdevice device) {
    if (!initialised) return NOT_INITIALIZED;
    if (device < 0 || device >= device_count) return INVALID_DEVICE;
    *context = &primary_context;
    return SUCCESS;
}

CUresult cuCtxSetCurrent(void *context) { return context == &primary_context ? SUCCESS : INVALID_VALUE; }

CUresult cuCtxSynchronize(void) { return SUCCESS; }

CUresult cuMemAlloc_v2(uint64_t *pointer, size_t size) {
    void *memory = malloc(size);
    if (!memory) return 2; /* CUDA_ERROR_OUT_OF_MEMORY */
    *pointer = (uint64_t)(uintptr_t)memory;
    return SUCCESS;
}

CUresult cuMemFree_v2(uint64_t pointer) {
    free((void *)(uintptr_t)pointer);
    return SUCCESS;
}

CUresult cuMemAllocHost_v2(void **pointer, size_t size) {
    *pointer = malloc(size);
    return *pointer ? SUCCESS : 2;
}

CUresult cuMemFreeHost(void *pointer) {
    free(pointer);
    return SUCCESS;
}

CUresult cuMemcpyHtoD_v2(uint64_t device, const void *host, size_t count) {
    memcpy((void *)(uintptr_t)device, host, count);
    return SUCCESS;
}

CUresult cuMemcpyDtoH_v2(void *host, uint64_t device, size_t count) {
    memcpy(host, (const void *)(uintptr_t)device, count);
    return SUCCESS;
}

/* cuda-bindings asks for every function by its base name and gets the newest version
   of it (cuMemAlloc -> cuMemAlloc_v2), as from the real driver; hand out ours. */
CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, uint64_t flags,
                             int *status) {
    (void)version;
    (void)flags;
    Dl_info self;
    void *found = NULL;
    if (dladdr((void *)cuInit, &self)) {
        void *handle = dlopen(self.dli_fname, RTLD_NOW | RTLD_NOLOAD);
        if (handle) {
            char versioned[128];
            snprintf(versioned, sizeof versioned, "%s_v2", symbol);
            found = dlsym(handle, versioned);
            if (!found) found = dlsym(handle, symbol);
            dlclose(handle);
        }
    }
    if (pfn) *pfn = found;
    if (status) *status = found ? 0 : 1; /* CU_GET_PROC_ADDRESS_SUCCESS / _SYMBOL_NOT_FOUND */
    return found ? SUCCESS : NOT_FOUND;
}

CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, uint64_t flags) {
    return cuGetProcAddress_v2(symbol, pfn, version, flags, NULL);
}
