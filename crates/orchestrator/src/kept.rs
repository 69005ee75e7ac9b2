//! The tasks the orchestrator keeps in memory between batches, so that a batch of reports
//! on them is decided without first reading them under the lock: it writes in one round
//! trip, fenced (`Tx::fence`), instead of two.
//!
//! A task is kept as a batch left it once committed: its head and every one of its steps
//! with their children, read in whole (under the lock) by the batch that first saw it and
//! changed since only by batches of this orchestrator. Nothing here is trusted: the fence
//! checks, with the task locked, that the task's and its steps' sort keys are still the
//! kept ones (every change anywhere raises one), and when another writer (an operator, a
//! replica) changed the task, the batch is decided again from reads, and the task is no
//! longer kept (replicas sharing a task's reports would otherwise each find it changed
//! almost every time), unless another batch of this orchestrator on the task was under way
//! (then it may have been the writer: the task is read in whole again). Only small tasks
//! are kept, up to a bounded number of steps in all; a task leaves when it finishes, when a
//! batch on it fails (its commit's fate may be unknown), or when room is needed (the least
//! recently used go first).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use tasker_domain::{StepState, TraceContext};
use tasker_proto::messages::CreatedTask;
use tasker_store::{CreatedStep, Loaded, Standing, StepRow, TaskHead, WholeTask};
use uuid::Uuid;

/// Most steps a task may have to be kept.
pub(crate) const MAX_STEPS_PER_TASK: i64 = tasker_store::MAX_KEPT_STEPS as i64;
/// Most steps kept in all (each a row of a few hundred bytes).
const MAX_STEPS: usize = 100_000;
/// Most tasks remembered as not to keep (so their batches do not read them in whole
/// again); forgotten all at once past it.
const MAX_UNKEPT: usize = 10_000;

#[derive(Clone, Default)]
pub(crate) struct Keeper(Arc<Mutex<Inner>>);

#[derive(Default)]
struct Inner {
    tasks: HashMap<Uuid, Kept>,
    /// Steps of the kept tasks, in all.
    steps: usize,
    /// How many batches under way hold each task.
    busy: HashMap<Uuid, usize>,
    /// Tasks not to keep: more than [`MAX_STEPS_PER_TASK`] steps, or changed by another
    /// writer while kept.
    unkept: HashSet<Uuid>,
    /// Counts uses, to find the least recently used.
    clock: u64,
}

struct Kept {
    head: TaskHead,
    whole: WholeTask,
    used: u64,
    /// Kept from a task request's word, which no committed batch has checked yet.
    told: bool,
}

/// A task as its creator wrote it, from a task request's `created`.
#[derive(Debug)]
pub struct Created {
    head: TaskHead,
    whole: WholeTask,
}

impl Created {
    /// The task `id` as the request tells it was created; `None` when what it tells is not
    /// a task that could be kept (too many steps, an id or a parent that is not one).
    pub fn from_request(id: Uuid, created: CreatedTask) -> Option<Created> {
        if created.steps.is_empty() || created.steps.len() as i64 > MAX_STEPS_PER_TASK {
            return None;
        }
        let at = chrono::DateTime::from_timestamp_micros(created.created_at_unix_us)?;
        let steps = created
            .steps
            .into_iter()
            .map(|s| {
                Some(CreatedStep {
                    id: s.id.parse().ok()?,
                    name: s.name,
                    handler: s.handler,
                    config: s.config_json,
                    max_attempts: i32::try_from(s.max_attempts).ok()?,
                    retryable: s.retryable,
                    timeout_ms: i64::try_from(s.timeout_ms).ok()?,
                    parents: s.parents.into_iter().map(|p| p as usize).collect(),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let whole = WholeTask::created(id, steps)?;
        let trace = TraceContext::from_headers(&created.task_trace_context);
        let head = TaskHead::created(id, created.namespace, created.name, created.version, at, trace);
        Some(Created { head, whole })
    }
}

/// A task's version: the sum of its own and its steps' sort keys, which every change
/// raises.
fn version(head: &TaskHead, steps: &HashMap<Uuid, StepRow>) -> i64 {
    i64::from(head.sort_key()) + step_keys(steps)
}

/// The sum of the steps' sort keys, as the fence computes it.
pub(crate) fn step_keys(steps: &HashMap<Uuid, StepRow>) -> i64 {
    steps.values().map(|s| i64::from(s.sort_key())).sum()
}

/// The tasks of a batch under way, marked busy until it is dropped.
pub(crate) struct Busy {
    keeper: Keeper,
    tasks: Vec<Uuid>,
    /// Another batch under way held one of them when this one began.
    pub(crate) shared: bool,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut inner = self.keeper.lock();
        for id in &self.tasks {
            if let Some(n) = inner.busy.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    inner.busy.remove(id);
                }
            }
        }
    }
}

/// What a batch decided from kept tasks starts from.
pub(crate) struct FromKept {
    pub(crate) loaded: Loaded,
    /// The kept tasks in whole, to keep again with the batch's changes.
    pub(crate) wholes: HashMap<Uuid, WholeTask>,
    /// Those kept from a task request's word: the batch checks them against the database
    /// (`Tx::fence`).
    pub(crate) told: Vec<Uuid>,
}

impl Keeper {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().expect("kept tasks lock")
    }

    /// Marks the tasks busy for as long as the returned guard lives.
    pub(crate) fn busy(&self, tasks: &[Uuid]) -> Busy {
        let mut tasks = tasks.to_vec();
        tasks.sort_unstable();
        tasks.dedup();
        let mut inner = self.lock();
        let mut shared = false;
        for id in &tasks {
            let n = inner.busy.entry(*id).or_default();
            shared |= *n > 0;
            *n += 1;
        }
        Busy { keeper: self.clone(), tasks, shared }
    }

    /// Of these tasks, those a batch that reads should read in whole (to keep them as it
    /// leaves them): all but those not to keep.
    pub(crate) fn to_read_whole(&self, tasks: &[Uuid]) -> Vec<Uuid> {
        let inner = self.lock();
        let mut ids: Vec<Uuid> = tasks.iter().copied().filter(|id| !inner.unkept.contains(id)).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// What a batch naming `steps` (reported complete: `completed`) of these tasks, and
    /// evaluating those of `evaluate`, starts from, if every task is kept: as the first
    /// round trip would read it.
    pub(crate) fn load(
        &self,
        tasks: &[Uuid],
        steps: &[Uuid],
        completed: &[Uuid],
        evaluate: &[Uuid],
    ) -> Option<FromKept> {
        let mut inner = self.lock();
        if !tasks.iter().all(|id| inner.tasks.contains_key(id)) {
            return None;
        }
        inner.clock += 1;
        let now = inner.clock;
        let mut from = FromKept { loaded: Loaded::default(), wholes: HashMap::new(), told: Vec::new() };
        for id in tasks {
            let kept = inner.tasks.get_mut(id).expect("kept, checked above");
            kept.used = now;
            if kept.told && !from.told.contains(id) {
                from.told.push(*id);
            }
            from.loaded.tasks.insert(*id, kept.head.clone());
            from.wholes.insert(*id, kept.whole.clone());
        }
        let loaded = &mut from.loaded;
        let step_of = |id: &Uuid| from.wholes.values().find_map(|w| w.steps.get(id));
        for id in steps {
            if let Some(step) = step_of(id) {
                loaded.steps.insert(*id, step.clone());
            }
        }
        for id in completed {
            let Some(step) = step_of(id) else { continue };
            let children = from.wholes[&step.task_id].children.get(id).cloned().unwrap_or_default();
            for child in &children {
                if let Some(row) = step_of(child) {
                    loaded.steps.entry(*child).or_insert_with(|| row.clone());
                }
            }
            loaded.children.insert(*id, children);
        }
        // the ready steps of the tasks to evaluate, by task, then as created (ids are
        // ordered, and a template lists its steps in topological order)
        let mut evaluate = evaluate.to_vec();
        evaluate.sort_unstable();
        evaluate.dedup();
        for id in &evaluate {
            let mut ready: Vec<&StepRow> = from.wholes[id]
                .steps
                .values()
                .filter(|s| s.status == StepState::Pending && s.pending_parents == 0)
                .collect();
            ready.sort_unstable_by_key(|s| s.id);
            for step in ready {
                loaded.ready.push(step.id);
                loaded.steps.entry(step.id).or_insert_with(|| step.clone());
            }
        }
        // how each task's steps that no item names stand, as the first round trip reads it
        for (id, whole) in &from.wholes {
            let mut standing = Standing::default();
            for step in whole.steps.values().filter(|s| !steps.contains(&s.id)) {
                standing.count(step);
            }
            loaded.standing.insert(*id, standing);
        }
        Some(from)
    }

    /// Keeps each task as a committed batch left it: `wholes` as they were when it began
    /// (read under its locks, or kept), with the batch's `tasks` and `steps` as they are
    /// now. Finished tasks and tasks not in `wholes` are not kept.
    pub(crate) fn keep(
        &self,
        mut wholes: HashMap<Uuid, WholeTask>,
        tasks: &HashMap<Uuid, TaskHead>,
        steps: &HashMap<Uuid, StepRow>,
    ) {
        for step in steps.values() {
            if let Some(whole) = wholes.get_mut(&step.task_id) {
                whole.steps.insert(step.id, step.clone());
            }
        }
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        for (id, head) in tasks {
            if head.status.is_final() {
                inner.unkept.remove(id);
            }
            let keep = !head.status.is_final();
            let Some(whole) = wholes.remove(id).filter(|_| keep) else {
                inner.remove(id);
                continue;
            };
            // a batch that began later may have kept a newer state already (but the same
            // state, checked now, replaces a request's word for it)
            if inner.tasks.get(id).is_some_and(|k| {
                let (kept, now) = (version(&k.head, &k.whole.steps), version(head, &whole.steps));
                kept > now || (kept == now && !k.told)
            }) {
                continue;
            }
            inner.remove(id);
            inner.steps += whole.steps.len();
            inner.tasks.insert(*id, Kept { head: head.clone(), whole, used: now, told: false });
        }
        inner.make_room();
    }

    /// Keeps a task as its creator says it created it, unless it is kept already (a later
    /// state) or not to be kept. Nothing is trusted: the batch that uses it checks, with
    /// the task locked, that it is unchanged (the fence) and that it is the task stored
    /// (`Tx::fence`), and only once that batch commits is it kept as checked.
    pub(crate) fn offer(&self, created: &Created) {
        let id = created.head.id;
        let mut inner = self.lock();
        if inner.tasks.contains_key(&id) || inner.unkept.contains(&id) {
            return;
        }
        inner.clock += 1;
        let used = inner.clock;
        inner.steps += created.whole.steps.len();
        inner.tasks.insert(id, Kept { head: created.head.clone(), whole: created.whole.clone(), used, told: true });
        inner.make_room();
    }

    /// Forgets these tasks (a batch on them failed).
    pub(crate) fn forget(&self, tasks: &[Uuid]) {
        let mut inner = self.lock();
        for id in tasks {
            inner.remove(id);
        }
    }

    /// A batch's fence found these tasks changed (it names them; the batch's tasks, should
    /// it not). When another batch of this orchestrator holds one of them now, that batch
    /// may be the writer: the tasks are forgotten, to be read in whole again. Otherwise
    /// another writer changed them (an operator, a replica, a made-up request), and they are
    /// kept no longer. The batch's other tasks stay kept, and are read again with it.
    pub(crate) fn stale(&self, tasks: &[Uuid]) {
        let ours = {
            let inner = self.lock();
            tasks.iter().any(|id| inner.busy.get(id).is_some_and(|n| *n > 1))
        };
        if ours { self.forget(tasks) } else { self.unkeep(tasks.iter().copied()) }
    }

    /// Forgets these tasks and keeps them no longer (until they finish): read in whole
    /// and found too big, or found changed by another writer.
    pub(crate) fn unkeep(&self, tasks: impl IntoIterator<Item = Uuid>) {
        let mut inner = self.lock();
        if inner.unkept.len() > MAX_UNKEPT {
            inner.unkept.clear();
        }
        for id in tasks {
            inner.remove(&id);
            inner.unkept.insert(id);
        }
    }
}

/// Debug builds (the tests) check, before a batch decided from kept tasks goes on, that
/// the kept tasks are exactly what the database holds (every column the engine decides
/// by, but a step's `last_published_at`, which no batch decided from kept tasks reads),
/// reading them in whole under the fence's locks: one more round trip.
#[cfg(debug_assertions)]
pub(crate) async fn check(tx: &mut tasker_store::Tx, from: &FromKept) -> tasker_store::Result<()> {
    let ids: Vec<Uuid> = from.wholes.keys().copied().collect();
    let stored = tx.load_batch(&ids, &[], &[], &[], (&ids, MAX_STEPS_PER_TASK)).await?;
    let head = |t: &TaskHead| format!("{:?}", (t.status, t.started_at, t.completed_at, t.sort_key()));
    let step = |s: &StepRow| {
        let config: Option<serde_json::Value> = serde_json::from_str(&s.config).ok();
        let error: Option<serde_json::Value> = s.last_error.as_deref().and_then(|e| serde_json::from_str(e).ok());
        format!(
            "{:?}",
            (
                (&s.name, &s.handler, config, s.status, s.attempts, s.attempts_before_retry, s.max_attempts),
                (s.retryable, s.timeout_ms, s.pending_parents, s.next_attempt_at, error),
                (s.enqueued_at, s.started_at, s.completed_at, s.sort_key()),
            )
        )
    };
    for (id, kept) in &from.wholes {
        let (Some(task), Some(whole)) = (stored.tasks.get(id), stored.whole.get(id)) else {
            panic!("kept task {id} is gone from the database");
        };
        assert_eq!(head(&from.loaded.tasks[id]), head(task), "kept task {id} differs from the database's");
        let sorted = |w: &WholeTask| {
            let mut steps: Vec<String> = w.steps.values().map(step).collect();
            steps.sort();
            let mut children: Vec<(Uuid, Vec<Uuid>)> = w
                .children
                .iter()
                .map(|(parent, children)| {
                    let mut children = children.clone();
                    children.sort();
                    (*parent, children)
                })
                .collect();
            children.sort();
            (steps, children)
        };
        assert_eq!(sorted(kept), sorted(whole), "kept task {id}'s steps differ from the database's");
    }
    Ok(())
}

impl Inner {
    fn remove(&mut self, id: &Uuid) {
        if let Some(kept) = self.tasks.remove(id) {
            self.steps -= kept.whole.steps.len();
        }
    }

    /// Past [`MAX_STEPS`], forgets the least recently used tasks down to three quarters of
    /// it.
    fn make_room(&mut self) {
        if self.steps <= MAX_STEPS {
            return;
        }
        let mut by_use: Vec<(u64, Uuid)> = self.tasks.iter().map(|(id, k)| (k.used, *id)).collect();
        by_use.sort_unstable();
        for (_, id) in by_use {
            if self.steps <= MAX_STEPS * 3 / 4 {
                break;
            }
            self.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tasker_domain::{Limits, TaskState, Template};
    use tasker_store::{Store, Workload};
    use tasker_test_support::TestEnv;

    use super::*;

    const CHAIN: &str = "namespace: kept\nname: unit\nversion: 1.0.0\nsteps:\n  - { name: a, handler: noop }\n  - { name: b, handler: noop, depends_on: [a] }\n  - { name: c, handler: noop, depends_on: [b] }\n";

    /// A store and a task of three steps, as a batch reads it in whole.
    async fn read_whole(env: &TestEnv) -> (Store, TaskHead, WholeTask) {
        let store = Store::connect(&env.config.database.url, 2, Workload::Keyed).await.unwrap();
        let template = Template::from_yaml(CHAIN, &Limits::default()).unwrap();
        let record = store.register_template(&template).await.unwrap().record;
        let id = store.create_task(&tasker_test_support::new_task(&record)).await.unwrap().task_id;
        let mut tx = store.begin().await.unwrap();
        let mut loaded = tx.load_batch(&[id], &[], &[], &[], (&[id], MAX_STEPS_PER_TASK)).await.unwrap();
        tx.commit().await.unwrap();
        let (head, whole) = (loaded.tasks.remove(&id).unwrap(), loaded.whole.remove(&id).unwrap());
        assert_eq!(whole.steps.len(), 3);
        (store, head, whole)
    }

    /// The same task under another id (its steps moved along).
    fn copy(head: &TaskHead, whole: &WholeTask) -> (TaskHead, WholeTask) {
        let id = tasker_domain::new_id();
        let mut whole = whole.clone();
        whole.steps.values_mut().for_each(|s| s.task_id = id);
        let mut head = head.clone();
        head.id = id;
        (head, whole)
    }

    /// Keeps these tasks as a committed batch that changed nothing would.
    fn keep(keeper: &Keeper, tasks: &[(TaskHead, WholeTask)]) {
        let heads = tasks.iter().map(|(h, _)| (h.id, h.clone())).collect();
        let wholes = tasks.iter().map(|(h, w)| (h.id, w.clone())).collect();
        keeper.keep(wholes, &heads, &HashMap::new());
    }

    fn is_kept(keeper: &Keeper, id: Uuid) -> bool {
        keeper.load(&[id], &[], &[], &[]).is_some()
    }

    /// Whether a batch that reads would read the task in whole (to keep it).
    fn to_keep(keeper: &Keeper, id: Uuid) -> bool {
        keeper.to_read_whole(&[id]) == [id]
    }

    #[tokio::test]
    async fn a_task_is_kept_until_it_finishes_or_a_batch_on_it_fails() {
        let env = TestEnv::new().await;
        let (_, head, whole) = read_whole(&env).await;
        let keeper = Keeper::default();
        let id = head.id;
        keep(&keeper, &[(head.clone(), whole.clone())]);
        let from = keeper.load(&[id], &[], &[], &[]).expect("kept");
        assert_eq!(from.wholes[&id].steps.len(), 3);
        assert_eq!(from.loaded.standing[&id], {
            let mut standing = Standing::default();
            whole.steps.values().for_each(|s| standing.count(s));
            standing
        });

        keeper.forget(&[id]);
        assert!(!is_kept(&keeper, id) && to_keep(&keeper, id), "a failed batch's task is read again, and kept");

        keeper.unkeep([id]);
        assert!(!is_kept(&keeper, id) && !to_keep(&keeper, id), "changed by another writer: kept no longer");
        let mut finished = head.clone();
        finished.status = TaskState::Complete;
        keep(&keeper, &[(finished, whole.clone())]);
        assert!(!is_kept(&keeper, id), "a finished task is not kept");
        assert!(to_keep(&keeper, id), "nor remembered as not to keep");
        env.cleanup().await;
    }

    #[tokio::test]
    async fn a_stale_task_another_batch_holds_is_read_again_else_kept_no_longer() {
        let env = TestEnv::new().await;
        let (_, head, whole) = read_whole(&env).await;
        let keeper = Keeper::default();
        let (alone, shared) = (copy(&head, &whole), copy(&head, &whole));
        keep(&keeper, &[alone.clone(), shared.clone()]);

        // only this batch held it: another writer changed it
        let batch = keeper.busy(&[alone.0.id]);
        assert!(!batch.shared);
        keeper.stale(&[alone.0.id]);
        drop(batch);
        assert!(!is_kept(&keeper, alone.0.id) && !to_keep(&keeper, alone.0.id));

        // another batch of this orchestrator held it too: it may have been the writer
        let first = keeper.busy(&[shared.0.id]);
        let second = keeper.busy(&[shared.0.id]);
        assert!(!first.shared && second.shared);
        keeper.stale(&[shared.0.id]);
        drop((first, second));
        assert!(!is_kept(&keeper, shared.0.id) && to_keep(&keeper, shared.0.id));
        assert!(keeper.lock().busy.is_empty(), "every batch let go of its tasks");
        env.cleanup().await;
    }

    #[tokio::test]
    async fn a_batch_that_began_earlier_does_not_overwrite_a_newer_kept_state() {
        let env = TestEnv::new().await;
        let (store, head, whole) = read_whole(&env).await;
        let mut started = head.clone();
        let mut tx = store.begin().await.unwrap();
        tx.transition_task(&mut started, TaskState::InProgress, json!({})).unwrap();
        tx.rollback().await.unwrap();
        assert!(started.sort_key() > head.sort_key());

        let keeper = Keeper::default();
        keep(&keeper, &[(started.clone(), whole.clone())]);
        keep(&keeper, &[(head.clone(), whole.clone())]);
        let from = keeper.load(&[head.id], &[], &[], &[]).unwrap();
        assert_eq!(from.loaded.tasks[&head.id].status, TaskState::InProgress, "the newer state stays");
        env.cleanup().await;
    }

    #[tokio::test]
    async fn past_its_bound_the_least_recently_used_tasks_go() {
        let env = TestEnv::new().await;
        let (_, head, whole) = read_whole(&env).await;
        let keeper = Keeper::default();
        let tasks: Vec<(TaskHead, WholeTask)> = (0..MAX_STEPS / 3 + 1_000).map(|_| copy(&head, &whole)).collect();
        let (first, second, last) = (tasks[0].0.id, tasks[1].0.id, tasks[tasks.len() - 1].0.id);
        let mut touched = false;
        for chunk in tasks.chunks(1_000) {
            // just before the bound is passed, the first is used again; the second is not
            if !touched && keeper.lock().steps + 3 * chunk.len() > MAX_STEPS {
                assert!(is_kept(&keeper, first));
                touched = true;
            }
            keep(&keeper, chunk);
        }
        assert!(touched);
        {
            let inner = keeper.lock();
            assert!(inner.steps <= MAX_STEPS, "{} steps kept", inner.steps);
            assert_eq!(inner.steps, inner.tasks.values().map(|k| k.whole.steps.len()).sum::<usize>());
            assert!(inner.tasks.len() < tasks.len());
        }
        assert!(is_kept(&keeper, first), "used lately: kept");
        assert!(!is_kept(&keeper, second), "the least recently used went first");
        assert!(is_kept(&keeper, last));
        assert!(to_keep(&keeper, second), "room, not a change: read again and kept");
        env.cleanup().await;
    }
}
