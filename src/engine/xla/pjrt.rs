//! A thin binding of the PJRT C API (`xla/pjrt/c/pjrt_c_api.h`, OpenXLA): the runtime under
//! JAX, reached through a plugin library that exports `GetPjrtApi` (the CPU plugin of the PyPI
//! wheel `lammps-jax-pjrt-cpu`, or `xla_cuda_plugin.so` of `jax-cuda12-pjrt`).
//!
//! Only what elbo's XLA engine needs: create a client on the first addressable device, compile a
//! StableHLO module (MLIR text), copy f32 arrays in and out, run an executable. Every argument
//! struct starts with its `struct_size`; the plugin reads the fields the caller declares and
//! treats later ones as unset, so a struct here is the prefix of the header's that this file
//! fills, zero-padded ([`Args`]) up to the size the newest plugins check (API 0.115). The
//! function table [`Api`] is the header's `PJRT_Api`, whose functions are only ever appended.

use std::ffi::c_void;
use std::path::Path;
use std::ptr::null_mut;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

/// The header's `PJRT_Api_Version`.
#[repr(C)]
struct ApiVersion {
    struct_size: usize,
    extension_start: *mut c_void,
    major: i32,
    minor: i32,
}

/// The functions of `PJRT_Api`, in the header's order, up to the last one used here.
const FUNCTIONS: [&str; 71] = [
    "Error_Destroy",
    "Error_Message",
    "Error_GetCode",
    "Plugin_Initialize",
    "Plugin_Attributes",
    "Event_Destroy",
    "Event_IsReady",
    "Event_Error",
    "Event_Await",
    "Event_OnReady",
    "Client_Create",
    "Client_Destroy",
    "Client_PlatformName",
    "Client_ProcessIndex",
    "Client_PlatformVersion",
    "Client_Devices",
    "Client_AddressableDevices",
    "Client_LookupDevice",
    "Client_LookupAddressableDevice",
    "Client_AddressableMemories",
    "Client_Compile",
    "Client_DefaultDeviceAssignment",
    "Client_BufferFromHostBuffer",
    "DeviceDescription_Id",
    "DeviceDescription_ProcessIndex",
    "DeviceDescription_Attributes",
    "DeviceDescription_Kind",
    "DeviceDescription_DebugString",
    "DeviceDescription_ToString",
    "Device_GetDescription",
    "Device_IsAddressable",
    "Device_LocalHardwareId",
    "Device_AddressableMemories",
    "Device_DefaultMemory",
    "Device_MemoryStats",
    "Memory_Id",
    "Memory_Kind",
    "Memory_DebugString",
    "Memory_ToString",
    "Memory_AddressableByDevices",
    "Executable_Destroy",
    "Executable_Name",
    "Executable_NumReplicas",
    "Executable_NumPartitions",
    "Executable_NumOutputs",
    "Executable_SizeOfGeneratedCodeInBytes",
    "Executable_GetCostAnalysis",
    "Executable_OutputMemoryKinds",
    "Executable_OptimizedProgram",
    "Executable_Serialize",
    "LoadedExecutable_Destroy",
    "LoadedExecutable_GetExecutable",
    "LoadedExecutable_AddressableDevices",
    "LoadedExecutable_Delete",
    "LoadedExecutable_IsDeleted",
    "LoadedExecutable_Execute",
    "Executable_DeserializeAndLoad",
    "LoadedExecutable_Fingerprint",
    "Buffer_Destroy",
    "Buffer_ElementType",
    "Buffer_Dimensions",
    "Buffer_UnpaddedDimensions",
    "Buffer_DynamicDimensionIndices",
    "Buffer_GetMemoryLayout",
    "Buffer_OnDeviceSizeInBytes",
    "Buffer_Device",
    "Buffer_Memory",
    "Buffer_Delete",
    "Buffer_IsDeleted",
    "Buffer_CopyToDevice",
    "Buffer_ToHostBuffer",
];

/// The header's `PJRT_Api`: its size, extensions, version, then the function pointers.
#[repr(C)]
struct Api {
    struct_size: usize,
    extension_start: *mut c_void,
    version: ApiVersion,
    functions: [*const c_void; FUNCTIONS.len()],
}

/// A PJRT function: a pointer to its argument struct in, a `PJRT_Error*` (null: success) out.
type Call = unsafe extern "C" fn(*mut c_void) -> *mut c_void;
/// `PJRT_Error_Destroy` and `PJRT_Error_Message` return nothing.
type VoidCall = unsafe extern "C" fn(*mut c_void);

/// The widest argument struct the newest plugins check, in words: every struct below is
/// declared in full up to the fields it sets, then zero-padded to this many words.
const ARGS_WORDS: usize = 24;

/// An argument struct: `struct_size` and `extension_start` (null), then `words` (the fields,
/// each one machine word as the header lays them out here), zero-padded.
#[repr(C)]
struct Args {
    words: [usize; ARGS_WORDS],
}

impl Args {
    /// An argument struct of `size` bytes (the header's `..._STRUCT_SIZE` at API 0.115, at
    /// least the fields set here) with `fields` after `struct_size` and `extension_start`.
    fn new(size: usize, fields: &[usize]) -> Self {
        let mut words = [0usize; ARGS_WORDS];
        words[0] = size;
        words[2..2 + fields.len()].copy_from_slice(fields);
        Self { words }
    }

    fn ptr(&mut self) -> *mut c_void {
        self.words.as_mut_ptr().cast()
    }
}

/// The loaded plugin, its client and the device everything runs on.
pub struct Runtime {
    calls: Vec<*const c_void>,
    client: *mut c_void,
    device: *mut c_void,
    platform: String,
    version: (i32, i32),
    // Dropped last: the library holds the code every pointer above points into.
    _library: libloading::Library,
}

// The PJRT client is thread-safe (the C API's contract); the pointers are only used through it.
unsafe impl Send for Runtime {}
unsafe impl Sync for Runtime {}

impl Runtime {
    /// Loads the plugin at `path`, initialises it and creates a client on its first device.
    pub fn load(path: &Path) -> Result<Arc<Self>> {
        if !path.is_file() {
            bail!(
                "{}: no PJRT plugin there (scripts/xla-plugin installs one)",
                path.display()
            );
        }
        // SAFETY: loading a library runs its initialisers; the plugin is a PJRT plugin by
        // the caller's choice, and `GetPjrtApi` is its documented entry point.
        let library = unsafe { libloading::Library::new(path) }
            .with_context(|| format!("{}: cannot load the PJRT plugin", path.display()))?;
        let api: *const Api = unsafe {
            let get: libloading::Symbol<unsafe extern "C" fn() -> *const Api> =
                library.get(b"GetPjrtApi\0").with_context(|| {
                    format!("{}: no GetPjrtApi (not a PJRT plugin)", path.display())
                })?;
            get()
        };
        if api.is_null() {
            bail!("{}: GetPjrtApi returned null", path.display());
        }
        // SAFETY: `api` points to the plugin's static PJRT_Api; only the prefix its
        // struct_size covers is read.
        let (size, version) = unsafe {
            (
                (*api).struct_size,
                ((*api).version.major, (*api).version.minor),
            )
        };
        let needed = std::mem::size_of::<Api>();
        if size < needed {
            bail!(
                "{}: PJRT API {}.{} has {size} bytes of functions, elbo needs {needed}",
                path.display(),
                version.0,
                version.1
            );
        }
        let calls = unsafe { (*api).functions.to_vec() };
        if let Some(i) = calls.iter().position(|f| f.is_null()) {
            bail!("{}: the plugin lacks PJRT_{}", path.display(), FUNCTIONS[i]);
        }
        let mut rt = Self {
            calls,
            client: null_mut(),
            device: null_mut(),
            platform: String::new(),
            version,
            _library: library,
        };
        rt.call("Plugin_Initialize", &mut Args::new(16, &[]))?;
        // PJRT_Client_Create_Args: options, num_options, kv get/put callbacks and their user
        // arguments, the client (out); 0.115 adds a try-get callback and its argument.
        let mut a = Args::new(88, &[]);
        rt.call("Client_Create", &mut a)?;
        rt.client = a.words[8] as *mut c_void;
        let mut a = Args::new(40, &[rt.client as usize]);
        rt.call("Client_PlatformName", &mut a)?;
        // SAFETY: the name is owned by the client, `words[4]` bytes long.
        rt.platform = unsafe {
            String::from_utf8_lossy(std::slice::from_raw_parts(
                a.words[3] as *const u8,
                a.words[4],
            ))
            .into_owned()
        };
        let mut a = Args::new(40, &[rt.client as usize]);
        rt.call("Client_AddressableDevices", &mut a)?;
        if a.words[4] == 0 {
            bail!(
                "{}: the PJRT client has no addressable device",
                path.display()
            );
        }
        // SAFETY: an array of `words[4]` device pointers owned by the client.
        rt.device = unsafe { *(a.words[3] as *const *mut c_void) };
        Ok(Arc::new(rt))
    }

    /// "cpu", "cuda", ...
    pub fn platform(&self) -> &str {
        &self.platform
    }

    /// The plugin's PJRT API version (major, minor).
    pub fn api_version(&self) -> (i32, i32) {
        self.version
    }

    fn function(&self, name: &str) -> *const c_void {
        let i = FUNCTIONS
            .iter()
            .position(|f| *f == name)
            .expect("a PJRT function of the table");
        self.calls[i]
    }

    /// Calls PJRT_`name` with `args`; a returned error becomes this error's message.
    fn call(&self, name: &str, args: &mut Args) -> Result<()> {
        // SAFETY: every function of the table takes a pointer to its argument struct; `args`
        // is laid out as the header's struct, zero beyond the fields set.
        let error = unsafe {
            let f: Call = std::mem::transmute(self.function(name));
            f(args.ptr())
        };
        self.check(error).with_context(|| format!("PJRT_{name}"))
    }

    /// Turns a `PJRT_Error*` into a result, destroying the error.
    fn check(&self, error: *mut c_void) -> Result<()> {
        if error.is_null() {
            return Ok(());
        }
        let mut m = Args::new(40, &[error as usize]);
        // SAFETY: the plugin's error functions take their argument structs; the message lives
        // as long as the error, which is destroyed after it is copied.
        let message = unsafe {
            let f: VoidCall = std::mem::transmute(self.function("Error_Message"));
            f(m.ptr());
            let text = std::slice::from_raw_parts(m.words[3] as *const u8, m.words[4]);
            let text = String::from_utf8_lossy(text).into_owned();
            let d: VoidCall = std::mem::transmute(self.function("Error_Destroy"));
            d(Args::new(24, &[error as usize]).ptr());
            text
        };
        bail!("XLA: {}", message.lines().next().unwrap_or("unknown error"))
    }

    /// Waits for `event` and destroys it.
    fn await_event(&self, event: *mut c_void) -> Result<()> {
        if event.is_null() {
            return Ok(());
        }
        let waited = self.call("Event_Await", &mut Args::new(24, &[event as usize]));
        let destroyed = self.call("Event_Destroy", &mut Args::new(24, &[event as usize]));
        waited.and(destroyed)
    }

    /// Compiles a StableHLO module (MLIR text) whose `main` returns `outputs` arrays.
    pub fn compile(self: &Arc<Self>, mlir: &str, outputs: usize) -> Result<Executable> {
        let format = b"mlir";
        // PJRT_Program: code, code_size, format, format_size.
        let mut program = Args::new(
            48,
            &[
                mlir.as_ptr() as usize,
                mlir.len(),
                format.as_ptr() as usize,
                format.len(),
            ],
        );
        // CompileOptionsProto { executable_build_options (3): { num_replicas (4): 1,
        // num_partitions (5): 1 } }, protobuf-encoded.
        let options: [u8; 6] = [0x1a, 0x04, 0x20, 0x01, 0x28, 0x01];
        let mut a = Args::new(
            56,
            &[
                self.client as usize,
                program.ptr() as usize,
                options.as_ptr() as usize,
                options.len(),
            ],
        );
        self.call("Client_Compile", &mut a)?;
        Ok(Executable {
            rt: self.clone(),
            ptr: a.words[6] as *mut c_void,
            outputs,
        })
    }

    /// Copies `data` (row-major, shape `dims`) to the device.
    pub fn upload(self: &Arc<Self>, data: &[f32], dims: &[usize]) -> Result<Buffer> {
        let n: usize = dims.iter().product();
        if n != data.len() {
            bail!("XLA upload: {} values for shape {dims:?}", data.len());
        }
        let dims64: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        const F32: usize = 11; // PJRT_Buffer_Type_F32
        const IMMUTABLE_ONLY_DURING_CALL: usize = 0;
        // PJRT_Client_BufferFromHostBuffer_Args: client, data, type, dims, num_dims,
        // byte_strides, num_byte_strides, semantics, device, memory, device_layout,
        // done_with_host_buffer (out), buffer (out).
        let mut a = Args::new(
            120,
            &[
                self.client as usize,
                data.as_ptr() as usize,
                F32,
                dims64.as_ptr() as usize,
                dims64.len(),
                0,
                0,
                IMMUTABLE_ONLY_DURING_CALL,
                self.device as usize,
            ],
        );
        self.call("Client_BufferFromHostBuffer", &mut a)?;
        let buffer = Buffer {
            rt: self.clone(),
            ptr: a.words[14] as *mut c_void,
            len: n,
            dims: dims.to_vec(),
        };
        self.await_event(a.words[13] as *mut c_void)?;
        Ok(buffer)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if !self.client.is_null() {
            let _ = self.call(
                "Client_Destroy",
                &mut Args::new(24, &[self.client as usize]),
            );
        }
    }
}

/// A compiled program on the runtime's device.
pub struct Executable {
    rt: Arc<Runtime>,
    ptr: *mut c_void,
    outputs: usize,
}

unsafe impl Send for Executable {}

impl Executable {
    /// Runs the program on `args` (its parameters in order) and returns its outputs.
    pub fn run(&self, args: &[&Buffer]) -> Result<Vec<Buffer>> {
        let inputs: Vec<*mut c_void> = args.iter().map(|b| b.ptr).collect();
        let input_lists: [*const *mut c_void; 1] = [inputs.as_ptr()];
        let mut outputs: Vec<*mut c_void> = vec![null_mut(); self.outputs];
        let output_lists: [*mut *mut c_void; 1] = [outputs.as_mut_ptr()];
        let mut events: [*mut c_void; 1] = [null_mut()];
        // PJRT_ExecuteOptions: send/recv callbacks and counts, launch_id, non-donatable
        // inputs, and (by 0.115) an execute context and task ids: all unset.
        let mut options = Args::new(112, &[]);
        // PJRT_LoadedExecutable_Execute_Args: executable, options, argument_lists,
        // num_devices, num_args, output_lists, device_complete_events, execute_device.
        let mut a = Args::new(
            80,
            &[
                self.ptr as usize,
                options.ptr() as usize,
                input_lists.as_ptr() as usize,
                1,
                inputs.len(),
                output_lists.as_ptr() as usize,
                events.as_mut_ptr() as usize,
            ],
        );
        self.rt.call("LoadedExecutable_Execute", &mut a)?;
        // Own the outputs before anything can fail, so they are freed.
        let outputs: Vec<Buffer> = outputs
            .into_iter()
            .map(|ptr| Buffer {
                rt: self.rt.clone(),
                ptr,
                len: 0,
                dims: Vec::new(),
            })
            .collect();
        self.rt.await_event(events[0])?;
        if outputs.iter().any(|b| b.ptr.is_null()) {
            bail!(
                "XLA: the program returned fewer than {} outputs",
                self.outputs
            );
        }
        Ok(outputs)
    }
}

impl Drop for Executable {
    fn drop(&mut self) {
        let _ = self.rt.call(
            "LoadedExecutable_Destroy",
            &mut Args::new(24, &[self.ptr as usize]),
        );
    }
}

/// An f32 array on the device.
pub struct Buffer {
    rt: Arc<Runtime>,
    ptr: *mut c_void,
    /// Values, where known (uploads); outputs are sized by [`Buffer::read`]'s destination.
    len: usize,
    dims: Vec<usize>,
}

unsafe impl Send for Buffer {}

impl Buffer {
    /// The shape it was uploaded with (empty for a program's output).
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// The values it was uploaded with (0 for a program's output).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no values (or is a program's output).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the array into `dst`, which must hold exactly its values.
    pub fn read(&self, dst: &mut [f32]) -> Result<()> {
        // PJRT_Buffer_ToHostBuffer_Args: src, host_layout, dst, dst_size, event (out).
        // With dst null the plugin reports the size it needs.
        let mut probe = Args::new(56, &[self.ptr as usize, 0, 0, 0]);
        self.rt.call("Buffer_ToHostBuffer", &mut probe)?;
        let need = probe.words[5];
        if need != std::mem::size_of_val(dst) {
            bail!(
                "XLA: an output of {need} bytes read into {} values",
                dst.len()
            );
        }
        let mut a = Args::new(
            56,
            &[
                self.ptr as usize,
                0,
                dst.as_mut_ptr() as usize,
                std::mem::size_of_val(dst),
            ],
        );
        self.rt.call("Buffer_ToHostBuffer", &mut a)?;
        self.rt.await_event(a.words[6] as *mut c_void)
    }

    /// The array as a vector of `n` values.
    pub fn to_vec(&self, n: usize) -> Result<Vec<f32>> {
        let mut v = vec![0f32; n];
        self.read(&mut v)?;
        Ok(v)
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            let _ = self
                .rt
                .call("Buffer_Destroy", &mut Args::new(24, &[self.ptr as usize]));
        }
    }
}
