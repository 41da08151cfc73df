# Fields named for the old design's flush: a change-log row's rows are delivered
# (invalidated and their events emitted), not flushed.

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ('ormbridge', '0005_change_log_progress'),
    ]

    operations = [
        migrations.RenameField(
            model_name='changebatch',
            old_name='flushed_at',
            new_name='delivered_at',
        ),
        migrations.RenameField(
            model_name='changebatch',
            old_name='pks_flushed',
            new_name='pks_delivered',
        ),
    ]
