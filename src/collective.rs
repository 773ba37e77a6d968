//! Data parallelism over processes: the collective operations elbo needs (all-reduce sum,
//! broadcast, barrier; rank and world size) behind one interface, with a single-process
//! implementation (the default build: every operation is the identity) and MPI's (cargo
//! feature `mpi`, the `mpi` crate over the system's MPI; launched as
//! `mpirun -np N elbo train ...`).
//!
//! How training uses it (`train::vae`, `train::diffusion`): every rank loads the data and
//! draws the same shuffle, binarization and noise as one process would for the whole global
//! batch (a few normals per example: a small fraction of a step), keeps the rows of its shard
//! ([`shard`]), computes the gradient of its rows scaled to the global batch's mean, and one
//! all-reduce (in buckets of at most [`BUCKET`] floats) sums the shards' gradients before the
//! optimiser step; so N ranks compute what one process computes, up to the order of the
//! floating-point sums. Rank 0 broadcasts the parameters and optimiser state at the start
//! (fresh or resumed), so every rank holds the same numbers, and rank 0 alone writes the run
//! folder. Evaluation shards the test set and sums per-example values into one vector, from
//! which every rank computes the means and standard errors one process computes.
//!
//! Communication per step for P parameters (a ring all-reduce): each rank sends and receives
//! 2 (N - 1) / N x 4 P bytes (see the README's scaling section).

use std::ops::Range;
use std::sync::OnceLock;

use anyhow::Result;

/// The largest number of floats one all-reduce call carries (MPI counts are 32-bit; a few
/// large buckets, not one call per tensor).
pub const BUCKET: usize = 1 << 24;

/// The collective operations of data-parallel training and evaluation.
pub trait Collective: Send + Sync {
    /// This process's index, 0..world_size.
    fn rank(&self) -> usize;
    /// The number of processes.
    fn world_size(&self) -> usize;
    /// `buf` becomes the element-wise sum of every rank's `buf`.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// As [`Collective::all_reduce_sum_f32`] in f64 (sums of losses and log-likelihoods).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// `buf` becomes rank `root`'s bytes (of any length) on every rank.
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the job (after an error on one of them), with exit status `code`.
    fn abort(&self, code: i32) -> !;
    /// The implementation, for the start-of-run line.
    fn name(&self) -> &'static str;
}

/// One process: rank 0 of 1, every collective the identity.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _: &mut Vec<u8>, _: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn name(&self) -> &'static str {
        "one process"
    }
}

static WORLD: OnceLock<Box<dyn Collective>> = OnceLock::new();

/// The process group this process belongs to: what [`init`] set up, else one process.
pub fn world() -> &'static dyn Collective {
    WORLD.get_or_init(|| Box::new(SingleProcess)).as_ref()
}

/// Keeps MPI initialised while it lives (MPI_Finalize when dropped); hold it in `main`.
pub struct Guard {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

/// Whether an MPI launcher started this process (Open MPI's, MPICH's and PMIx's variables).
pub fn launched_by_mpirun() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// Sets up the process group: with the `mpi` feature and under `mpirun`, MPI; otherwise one
/// process (MPI is not initialised: a singleton MPI_Init costs about a second). Call once,
/// first thing in `main`.
pub fn init() -> Result<Guard> {
    #[cfg(feature = "mpi")]
    if launched_by_mpirun() {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| anyhow::anyhow!("MPI was initialised twice"))?;
        let world = mpi_impl::Mpi::new(&universe);
        if WORLD.set(Box::new(world)).is_err() {
            anyhow::bail!("dist::init: the process group was already set up");
        }
        return Ok(Guard {
            _universe: Some(universe),
        });
    }
    world();
    Ok(Guard {
        #[cfg(feature = "mpi")]
        _universe: None,
    })
}

/// The contiguous share of `n` items (examples of a batch, test images) that `rank` of `size`
/// takes: `n rank / size .. n (rank + 1) / size` (sizes differ by at most one).
pub fn shard(n: usize, rank: usize, size: usize) -> Range<usize> {
    let size = size.max(1);
    (n * rank / size)..(n * (rank + 1) / size)
}

/// This process's share of `n` items.
pub fn my_shard(n: usize) -> Range<usize> {
    let w = world();
    shard(n, w.rank(), w.world_size())
}

/// All-reduces `buf` in buckets of at most [`BUCKET`] floats.
pub fn all_reduce_buckets(buf: &mut [f32]) -> Result<()> {
    let w = world();
    if w.world_size() == 1 {
        return Ok(());
    }
    for chunk in buf.chunks_mut(BUCKET) {
        w.all_reduce_sum_f32(chunk)?;
    }
    Ok(())
}

/// Whether this process writes (rank 0: the run folder, metrics, pictures, printed results).
pub fn is_main() -> bool {
    world().rank() == 0
}

#[cfg(feature = "mpi")]
mod mpi_impl {
    use anyhow::Result;
    use mpi::collective::SystemOperation;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    /// MPI_COMM_WORLD. MPI is initialised at MPI_THREAD_FUNNELED and elbo makes every MPI call
    /// from the main thread (rayon's workers compute, they never communicate).
    pub struct Mpi {
        world: SimpleCommunicator,
    }

    // SAFETY: see the type's comment: one thread makes every call.
    unsafe impl Send for Mpi {}
    // SAFETY: as above.
    unsafe impl Sync for Mpi {}

    impl Mpi {
        pub fn new(universe: &mpi::environment::Universe) -> Self {
            Self {
                world: universe.world(),
            }
        }
    }

    impl super::Collective for Mpi {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn world_size(&self) -> usize {
            self.world.size() as usize
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
            Ok(())
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
            Ok(())
        }
        fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
            let root = self.world.process_at_rank(root as i32);
            let mut len = [buf.len() as u64];
            root.broadcast_into(&mut len[..]);
            buf.resize(len[0] as usize, 0);
            // In pieces: MPI counts are 32-bit.
            for piece in buf.chunks_mut(1 << 30) {
                root.broadcast_into(piece);
            }
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            self.world.barrier();
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }
        fn name(&self) -> &'static str {
            "MPI"
        }
    }
}

/// NCCL (cargo feature `nccl`, with `cuda` and `mpi`): the sum over the ranks of a CUDA tensor,
/// on the GPUs, one process per GPU. The NCCL unique id is made by rank 0 and broadcast over
/// MPI (the usual bootstrap); the communicator lives for the process.
#[cfg(feature = "nccl")]
pub mod nccl {
    use std::sync::Mutex;

    use anyhow::{Result, bail};
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};

    /// The process's communicator (NCCL's calls are made from the main thread only).
    struct Shared(&'static Comm);
    // SAFETY: one thread (the main one) makes every NCCL call, as every MPI call.
    unsafe impl Send for Shared {}
    // SAFETY: as above.
    unsafe impl Sync for Shared {}

    static COMM: Mutex<Option<Shared>> = Mutex::new(None);

    /// The communicator of this process's GPU, made on first use.
    fn comm(device: &candle_core::CudaDevice) -> Result<&'static Comm> {
        let mut guard = COMM
            .lock()
            .map_err(|_| anyhow::anyhow!("nccl: a poisoned lock"))?;
        if let Some(Shared(c)) = guard.as_ref() {
            return Ok(c);
        }
        let world = super::world();
        let mut bytes = Vec::new();
        if world.rank() == 0 {
            let id = Id::new().map_err(|e| anyhow::anyhow!("nccl: unique id: {e:?}"))?;
            bytes = id.internal().iter().map(|&c| c as u8).collect();
        }
        world.broadcast_bytes(&mut bytes, 0)?;
        if bytes.len() != 128 {
            bail!("nccl: rank 0 sent a {}-byte id, expected 128", bytes.len());
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (dst, &b) in internal.iter_mut().zip(&bytes) {
            *dst = b as std::ffi::c_char;
        }
        let c = Comm::from_rank(
            device.cuda_stream(),
            world.rank(),
            world.world_size(),
            Id::uninit(internal),
        )
        .map_err(|e| anyhow::anyhow!("nccl: communicator of rank {}: {e:?}", world.rank()))?;
        let c: &'static Comm = Box::leak(Box::new(c));
        *guard = Some(Shared(c));
        Ok(c)
    }

    /// `ncclAllReduce(sum)` as a candle op: a fresh tensor holding the sum over the ranks.
    struct AllReduce(&'static Comm);

    impl CustomOp1 for AllReduce {
        fn name(&self) -> &'static str {
            "nccl-all-reduce"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("nccl: all-reduce takes CUDA tensors")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            use candle_core::backend::BackendStorage;
            let Some((from, to)) = l.contiguous_offsets() else {
                candle_core::bail!("nccl: all-reduce takes a contiguous tensor")
            };
            let device = s.device().clone();
            let src = s.as_cuda_slice::<f32>()?.slice(from..to);
            let mut dst = device.alloc_zeros::<f32>(to - from)?;
            self.0
                .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("nccl: all-reduce: {e:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, device), l.shape().clone()))
        }
    }

    /// The element-wise sum over the ranks of `t`, an f32 CUDA tensor (every rank passes one
    /// of the same shape).
    pub fn all_reduce(t: &Tensor) -> Result<Tensor> {
        let Device::Cuda(device) = t.device() else {
            bail!("nccl: all-reduce takes CUDA tensors");
        };
        let comm = comm(device)?;
        Ok(t.contiguous()?.apply_op1_no_bwd(&AllReduce(comm))?)
    }
}

#[cfg(test)]
mod tests {
    use super::shard;

    #[test]
    fn shards_cover_every_item_once_and_differ_by_at_most_one() {
        for n in [0, 1, 7, 20, 101] {
            for size in 1..5 {
                let parts: Vec<_> = (0..size).map(|r| shard(n, r, size)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[size - 1].end, n);
                for w in parts.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
                let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                assert!(hi - lo <= 1, "{n} over {size}: {lens:?}");
            }
        }
    }
}
