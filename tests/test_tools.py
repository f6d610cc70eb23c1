"""The project's measurement tools: complexity counting and the benchmark harness."""
import json
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, 'tools')
import complexity  # noqa: E402


def test_complexity_counts_aggregation_and_forms():
    row = complexity.variant_row('test', 64)
    assert row['gmacs_na2d'] > 0
    assert row['gmacs_paper_convention'] < row['gmacs_train']
    assert row['params_deploy'] < row['params_train']
    dense = complexity.dense_row('test', 'det', 64, 96)
    assert dense['gmacs'] > 0 and dense['params'] > 0


@pytest.mark.heavy
def test_complexity_t_matches_the_authors_model():
    """The counts of the authors' model at 224: deploy 5.65 G, training 5.99 G, without lk_origin 5.51 G."""
    row = complexity.variant_row('t', 224)
    assert row['params_train'] == 34_990_472 and row['params_deploy'] == 33_467_040
    assert abs(row['gmacs_deploy'] - 5.65) < 0.03
    assert abs(row['gmacs_train'] - 5.99) < 0.03
    assert abs(row['gmacs_paper_convention'] - 5.51) < 0.03


def test_benchmark_workers_import_their_own_checkout(tmp_path):
    """tools/benchmark.py of another checkout (a git worktree) times that checkout's overlock_core, not the
    installed one: here a stub package whose import fails with a message the worker reports."""
    (tmp_path / 'tools').mkdir()
    shutil.copy('tools/benchmark.py', tmp_path / 'tools')
    (tmp_path / 'overlock_core').mkdir()
    (tmp_path / 'overlock_core' / '__init__.py').write_text("raise ImportError('the stub checkout')\n")
    res = subprocess.run([sys.executable, str(tmp_path / 'tools' / 'benchmark.py'), '--models', 'test_overlock',
                          '--modes', 'infer', '--repeats', '1', '--iters', '1', '--threads', '1'],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert 'error: ImportError: the stub checkout' in res.stdout, res.stdout + res.stderr


def test_benchmark_harness_writes_json(tmp_path):
    out = tmp_path / 'b.json'
    res = subprocess.run([sys.executable, 'tools/benchmark.py', '--models', 'test_overlock', '--size', '64', '64',
                          '--batch', '2', '--iters', '1', '--threads', '1', '--paired', '2', '--json', str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())['rows']
    paired = [r for r in rows if 'paired' in r]
    rows = [r for r in rows if 'paired' not in r]
    assert {r['mode'] for r in rows} == {'infer', 'train'}
    assert all(r['seconds'] > 0 and r['peak_mib'] >= 0 for r in rows)
    # --paired: every model timed in one process, one step per round
    assert {r['paired'] for r in paired} == {'infer', 'train'}
    assert all(len(r['seconds']['test_overlock']) == 2 and min(r['seconds']['test_overlock']) > 0 for r in paired)
    assert 'paired, one process, 2 rounds, train: test_overlock' in res.stdout
    assert 'OverLoCK ran accelerated (lean=True)' in res.stdout  # the launchers' choice on CPUs (accel.auto_config)
    res = subprocess.run([sys.executable, 'tools/benchmark.py', '--models', 'test_overlock', '--size', '64', '64',
                          '--batch', '2', '--iters', '1', '--threads', '1', '--repeats', '1', '--modes', 'train',
                          '--no-lean', '--profile', '3'], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and 'OverLoCK ran accelerated (lean=False)' in res.stdout, res.stderr
    assert len([line for line in res.stdout.splitlines() if line.startswith('  test_overlock train:')]) == 3
    res = subprocess.run([sys.executable, 'tools/benchmark.py', '--ops', '--op-shapes', 'stage4@224 K7', '--batch',
                          '1', '--iters', '1', '--threads', '1', '--json', str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    row = json.loads(out.read_text())['rows'][0]
    assert row['ours']['peak_mib'] < row['unfold']['peak_mib']


def test_benchmark_dwconv_table_entries():
    """The depth-wise table's verdicts: an entry is True only where Triton beat cuDNN in every row of its key
    (layouts, inputs in one map bucket); the branch-set rows ('drb') give MEASURED_DRB's keys, the others
    MEASURED's; rows without both timings are left out."""
    import benchmark
    shapes = benchmark.dwconv_shapes(['224:2'])
    assert {(s['stage'], s['k'], s['h']) for s in shapes if s['d'] == 'drb'} == \
        {(1, 17, 56), (2, 15, 28), (3, 13, 14), (4, 7, 7)}
    row = dict(input='224:2', stage=1, batch=2, c=64, h=56, w=56, dtype='bf16')
    rows = [dict(row, k=17, d=1, layout='nchw', cudnn=2.0, triton=1.0),
            dict(row, k=17, d=1, layout='channels_last', cudnn=2.0, triton=3.0),
            dict(row, k=9, d=2, layout='nchw', cudnn=2.0, triton=1.0),
            dict(row, k=17, d='drb', layout='nchw', cudnn=5.0, triton=4.0),
            dict(row, k=17, d='drb', layout='channels_last', cudnn=5.0, triton=4.5),
            dict(row, k=15, d='drb', layout='nchw', cudnn=5.0, triton_error='boom')]
    assert benchmark.measured_entries(rows) == {(17, 1, 64, 'bf16'): False, (9, 2, 64, 'bf16'): True}
    assert benchmark.measured_entries(rows, drb=True) == {(17, 64, 'bf16'): True}


def test_benchmark_realistic_suite_runs_on_the_cpu(tmp_path):
    """The GPU figures' command (--realistic) end to end on a tiny model: the training (AdamW step), inference and
    dense backbone cases under bf16 and fp16 autocast (GradScaler), channels-last, in the table and the JSON."""
    out = tmp_path / 'r.json'
    res = subprocess.run([sys.executable, 'tools/benchmark.py', '--realistic', '--models', 'test_overlock',
                          '--size', '64', '64', '--realistic-batch', '2', '--dense-size', '64', '96',
                          '--dense-batch', '1', '--precisions', 'bf16', 'fp16', '--repeats', '1', '--warmup', '0',
                          '--iters', '1', '--threads', '1', '--json', str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())['rows']
    assert {(r['precision'], r['case']) for r in rows} == {(p, c) for p in ('bf16', 'fp16')
                                                           for c in ('train', 'infer', 'dense')}
    assert all('error' not in r and r['seconds'] > 0 for r in rows), rows
    assert '| test_overlock | fp16 | dense backbone train 64x96, batch 1 |' in res.stdout
    assert 'OverLoCK ran accelerated (lean=True)' in res.stdout and 'OverLoCK ran accelerated (lean=max)' in res.stdout


def test_gpu_check_runs_the_parts_asked_for(tmp_path):
    """tools/gpu_check.sh, dry run (PY a script that prints its arguments and the Triton switch): without arguments
    the correctness checks and the realistic figures; named parts add theirs, the Triton switch set for the Triton
    part only; an unknown part is refused, naming it, before anything runs."""
    py = tmp_path / 'py'
    py.write_text('#!/bin/sh\necho "PY $* switch=${OVERLOCK_TRITON_DWCONV:-unset}"\n')
    py.chmod(0o755)

    def run(*parts):
        env = {'PATH': '/usr/bin:/bin', 'PY': str(py), 'OUT': str(tmp_path / '_'.join(parts or ('default',))),
               'OVERLOCK_TRITON_DWCONV': '1'}  # the script starts from cuDNN whatever the caller's environment
        return subprocess.run(['bash', 'tools/gpu_check.sh', *parts], capture_output=True, text=True, env=env)

    default = run()
    assert default.returncode == 0 and 'at most 385 s' in default.stdout
    steps = [line.split()[1:] for line in default.stdout.splitlines() if line.startswith('PY ')]
    assert [s[:2] for s in steps] == [['-c', 'import'], ['-c', 'import'], ['-m', 'pytest'],
                                      ['tools/benchmark.py', '--device']]
    assert '--realistic' in steps[3] and all(s[-1] == 'switch=unset' for s in steps)
    extra = run('table', 'triton')
    steps = [line.split()[1:] for line in extra.stdout.splitlines() if line.startswith('PY tools/benchmark.py')]
    assert [('--ops' in s, s[-1]) for s in steps] == [(True, 'switch=unset'), (False, 'switch=1')]
    assert (tmp_path / 'table_triton' / 'log.txt').is_file()
    bad = run('check', 'bogus')
    assert bad.returncode == 2 and "unknown part 'bogus'" in bad.stderr and 'PY ' not in bad.stdout
