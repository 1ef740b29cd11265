"""Scoped names resolve from mmdet, mmseg and mmpretrain without custom_imports."""
import subprocess
import sys
import textwrap


def run_fresh(code):
    """Run ``code`` in a fresh interpreter (no module imported by the test session)."""
    result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_models_build_by_scoped_name_from_every_toolbox():
    out = run_fresh('''
        import sys
        from mmdet.registry import MODELS as DET
        from mmseg.registry import MODELS as SEG
        from mmpretrain.registry import MODELS as PRE
        assert 'mmreparam' not in sys.modules
        for registry in (DET, SEG, PRE):
            block = registry.build(dict(type='mmreparam.OREPA', in_channels=4,
                                        out_channels=8, kernel_size=3))
            print(type(block).__module__, type(block).__name__)
    ''')
    assert out.split('\n')[:3] == ['mmreparam.models.layers.orepa OREPA'] * 3


def test_scope_switch_inside_a_toolbox_build():
    # A block built while mmdet's default scope is active still finds mmengine's BN.
    run_fresh('''
        from mmengine.registry import DefaultScope
        from mmdet.registry import MODELS
        with DefaultScope.overwrite_default_scope('mmdet'):
            m = MODELS.build(dict(type='mmreparam.DBB', in_channels=4, out_channels=4,
                                  kernel_size=3, norm_cfg=dict(type='SyncBN')))
        assert type(m.dbb_origin.bn).__name__ == 'SyncBatchNorm'
    ''')


def test_hook_builds_by_scoped_name_through_mmengine():
    out = run_fresh('''
        from mmengine.registry import HOOKS
        hook = HOOKS.build(dict(type='mmreparam.FoldHook', fold_for_test=True))
        print(type(hook).__name__, hook.fold_for_test)
    ''')
    assert out.strip() == 'FoldHook True'
