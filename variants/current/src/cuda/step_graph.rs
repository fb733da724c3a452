//! The decode step as a CUDA graph whose consecutive kernels are joined by programmatic edges
//! (sm_90's programmatic dependent launch): [`StepGraph`].
//!
//! A plain graph starts a kernel only once its predecessor has finished, so every boundary
//! costs the time to launch the next grid, about 0.8-1 us on the H200 (`bench_phase_boundaries`
//! in tests.rs), some 150 times a SmolLM2 step. With a programmatic edge the next kernel's
//! blocks may be scheduled as soon as every block of its predecessor has executed
//! `griddepcontrol.launch_dependents`; they then wait in `griddepcontrol.wait` until the
//! predecessor has finished and its writes are visible. Every kernel of kernels.cu begins with
//! that wait (`after_predecessor`), so a kernel never reads or writes memory its predecessor
//! may still be using; the one-token matvecs first ask for their weights (which no kernel
//! writes) into L2, overlapping that fetch with the predecessor's tail.

use std::sync::Arc;

use cudarc::driver::{result, sys, CudaStream, DriverError};

/// An instantiated graph of one decode step, launched on the stream it was captured on.
pub(super) struct StepGraph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    stream: Arc<CudaStream>,
}

impl StepGraph {
    /// Captures what `launches` queues on `stream` (in the thread-local capture mode), turns
    /// each edge between two kernels into a programmatic one, and instantiates the graph.
    /// The capture always ends, so the stream is usable again whatever failed.
    pub(super) fn capture<E: From<DriverError>>(
        stream: &Arc<CudaStream>,
        launches: impl FnOnce() -> Result<(), E>,
    ) -> Result<Option<Self>, E> {
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let launched = launches();
        // SAFETY: the stream is live and capturing (begun above, on this thread).
        let ended = unsafe { result::stream::end_capture(stream.cu_stream()) };
        // Owned at once, so that a graph captured around a failed launch is destroyed, not
        // leaked; the launch's error, the cause, comes first.
        let step = match ended {
            Ok(graph) if !graph.is_null() => Some(Self {
                graph,
                exec: std::ptr::null_mut(),
                stream: stream.clone(),
            }),
            Ok(_) => None,
            Err(e) => {
                launched?;
                return Err(e.into());
            }
        };
        launched?;
        let Some(mut step) = step else {
            return Ok(None);
        };
        // SAFETY: `graph` is the live graph just captured, owned by `step` (which destroys it).
        unsafe {
            make_edges_programmatic(step.graph)?;
            step.exec = result::graph::instantiate(step.graph, sys::CUgraphInstantiate_flags(0))?;
        }
        Ok(Some(step))
    }

    /// How many of the graph's edges are programmatic (for the tests).
    #[cfg(test)]
    pub(super) fn programmatic_edges(&self) -> Result<usize, DriverError> {
        // SAFETY: the graph is live, and a query does not modify it.
        let data = unsafe { edges(self.graph)? }.2;
        let programmatic = sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC;
        Ok(data
            .iter()
            .filter(|e| e.type_ == programmatic as u8)
            .count())
    }

    /// Queues one replay of the step on its stream.
    pub(super) fn launch(&self) -> Result<(), DriverError> {
        self.stream.context().bind_to_thread()?;
        // SAFETY: `exec` was instantiated from `graph` (both live until drop) and the stream is
        // the one the graph was captured on.
        unsafe { result::graph::launch(self.exec, self.stream.cu_stream()) }
    }
}

impl Drop for StepGraph {
    fn drop(&mut self) {
        // SAFETY: both handles were created by `capture` and are destroyed only here; errors
        // are recorded in the context, as cudarc's own graph does.
        unsafe {
            if !self.exec.is_null() {
                self.stream
                    .context()
                    .record_err(result::graph::exec_destroy(self.exec));
            }
            self.stream
                .context()
                .record_err(result::graph::destroy(self.graph));
        }
    }
}

/// Every edge of `graph` from a kernel node to a kernel node becomes programmatic: the
/// successor may launch once each block of the predecessor has triggered (or exited).
///
/// # Safety
/// `graph` must be a live graph that is not being launched or modified elsewhere.
unsafe fn make_edges_programmatic(graph: sys::CUgraph) -> Result<(), DriverError> {
    let (from, to, data) = edges(graph)?;
    let programmatic = edge(
        sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8,
        sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC,
    );
    for i in 0..from.len() {
        if !(is_kernel(from[i])? && is_kernel(to[i])?) {
            continue;
        }
        sys::cuGraphRemoveDependencies_v2(graph, &from[i], &to[i], &data[i], 1).result()?;
        sys::cuGraphAddDependencies_v2(graph, &from[i], &to[i], &programmatic, 1).result()?;
    }
    Ok(())
}

/// The edges of `graph`: their sources, their targets and their data.
///
/// # Safety
/// `graph` must be a live graph that is not being modified elsewhere.
#[allow(clippy::type_complexity)] // three parallel lists, as the driver returns them
unsafe fn edges(
    graph: sys::CUgraph,
) -> Result<
    (
        Vec<sys::CUgraphNode>,
        Vec<sys::CUgraphNode>,
        Vec<sys::CUgraphEdgeData>,
    ),
    DriverError,
> {
    let mut n = 0usize;
    let none = std::ptr::null_mut();
    sys::cuGraphGetEdges_v2(graph, none, none, std::ptr::null_mut(), &mut n).result()?;
    let mut from: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); n];
    let mut to: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); n];
    let mut data = vec![
        edge(
            0,
            sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_DEFAULT
        );
        n
    ];
    sys::cuGraphGetEdges_v2(
        graph,
        from.as_mut_ptr(),
        to.as_mut_ptr(),
        data.as_mut_ptr(),
        &mut n,
    )
    .result()?;
    from.truncate(n);
    to.truncate(n);
    data.truncate(n);
    Ok((from, to, data))
}

/// An edge's data: the predecessor's outgoing port and the dependency's type.
fn edge(from_port: u8, kind: sys::CUgraphDependencyType) -> sys::CUgraphEdgeData {
    sys::CUgraphEdgeData {
        from_port,
        to_port: 0,
        type_: kind as u8,
        reserved: [0; 5],
    }
}

/// Whether `node` launches a kernel.
///
/// # Safety
/// `node` must be a node of a live graph.
unsafe fn is_kernel(node: sys::CUgraphNode) -> Result<bool, DriverError> {
    let mut kind = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
    sys::cuGraphNodeGetType(node, &mut kind).result()?;
    Ok(kind == sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL)
}
